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


class RefusesStepsAndSaves(RefusesMarkedSteps):
    """(tests/ray/test_shutdown_reports.py) Refuses step s while ``refuse-<s>`` is there, and cannot write
    its checkpoint of step s (as a full disk) while ``fail-save-<s>`` is there — failing_saves_shard's
    rule, in this module so that it travels by value with this class."""

    def save(self, keep=None):
        if self.checkpoint_dir is not None and os.path.exists(os.path.join(self.checkpoint_dir,
                                                                           f"fail-save-{self.step}")):
            raise OSError(28, f"No space left on device (injected, step {self.step})")
        return super().save(keep)
