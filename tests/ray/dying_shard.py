"""(tests/ray/test_review_keep.py) A Shard that exits right after it saved a loaded state, before answering (as a SIGKILL / OOM kill
landing in that window would): once, when the marker file is in its checkpoint directory."""
import os

from cembed.distributed._shard import Shard

MARKER = "die-after-load-save"


class DiesAfterLoadSave(Shard):
    def load(self, *args, **kwargs):
        out = super().load(*args, **kwargs)
        marker = os.path.join(self.checkpoint_dir, MARKER)
        if os.path.exists(marker):
            os.remove(marker)
            os._exit(1)
        return out
