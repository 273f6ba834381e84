"""(tests/ray/test_review_keep3.py) A Shard whose checkpoint of step s fails (as a full disk would) while the
file ``fail-save-<s>`` is in its checkpoint directory."""
import os

from cembed.distributed._shard import Shard


def marker(shard_dir, step):
    return os.path.join(shard_dir, f"fail-save-{step}")


class FailsSomeSaves(Shard):
    def save(self, keep=None):
        if self.checkpoint_dir is not None and os.path.exists(marker(self.checkpoint_dir, self.step)):
            raise OSError(28, f"No space left on device (injected, step {self.step})")
        return super().save(keep)
