"""Pure parts of the service: job ids."""

from __future__ import annotations

import re

from serving.requests import autolabel_job_id, finetune_job_id


def test_job_ids_are_valid_rq_ids_and_distinct_per_version():
    base = autolabel_job_id("3", 17, "efficientsam-ti-1a2b3c4d")
    tuned = autolabel_job_id("3", 17, "efficientsam-ti-1a2b3c4d+p3-ft1")
    for job_id in (base, tuned, finetune_job_id("3")):
        assert re.fullmatch(r"[A-Za-z0-9_-]+", job_id), job_id
    assert base != tuned and autolabel_job_id("3", 18, "efficientsam-ti-1a2b3c4d") != base
