"""(tests/ray/test_review_keep4.py) A Shard whose optimizer refuses step s (ValueError, as an optimizer refuses a step) while
the file ``refuse-<s>`` is in its checkpoint directory (it survives a restart, as a refusal that
comes from the shard's state does)."""
import os

from cembed.distributed._shard import Shard


def marker(shard_dir, step):
    return os.path.join(shard_dir, f"refuse-{step}")


class RefusesMarkedSteps(Shard):
    def apply(self, step, update):
        if step == self.step and self.checkpoint_dir is not None and os.path.exists(marker(self.checkpoint_dir, step)):
            raise ValueError(f"step {step} refused (injected)")
        return super().apply(step, update)
