"""An update whose loss turns non-finite is undone and skipped, so the trainer is not restarted into it for ever."""

import torch

from cl_agent.experience import ExperienceStore
from cl_agent.updater import Updater
from test_updater import backlog, ingest_experiences  # noqa: F401 - the fixture


def test_a_diverged_update_is_undone_and_skipped_and_the_next_one_trains(backlog):  # noqa: F811
    cfg = backlog("shorten")
    updater = Updater(cfg)
    try:
        first = updater.run_once()
        assert first.version == 1
        after_first = {k: v.clone() for k, v in updater.trainer.student.state_dict().items()}
        for group in updater.trainer.optimizer.param_groups:
            group["lr"] = 1e12  # as with a far too large train.lr: the loss becomes NaN within a few steps
        skipped = updater.run_once()
        assert skipped.experiences == [1] and skipped.version is None
        assert skipped.record["skipped"].startswith("training diverged: non-finite loss")
        assert ExperienceStore(cfg.agent.workdir).is_trained(1)
        restored = updater.trainer.student.state_dict()
        assert all(torch.equal(restored[k], v) for k, v in after_first.items())  # its steps were undone
        third = updater.run_once()
        assert third.experiences == [2] and third.version == 2
    finally:
        updater.close()
