"""Damaged state files in the working directory are one clear error naming the file, not a bare JSON traceback."""

import pytest

from cl_agent.errors import CLAgentError
from cl_agent.experience import ExperienceStore
from ingest_support import make_service


def test_damaged_labels_json_names_the_file(tmp_path):
    (tmp_path / "labels.json").write_text('{"names": ["a"')
    with pytest.raises(CLAgentError, match="labels.json"):
        make_service(tmp_path)


def test_damaged_experience_meta_names_the_file(tmp_path):
    folder = tmp_path / "experiences" / "000000"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text('{"index": 0, ')
    with pytest.raises(CLAgentError, match="000000/meta.json"):
        ExperienceStore(tmp_path).committed_keys()
    with pytest.raises(CLAgentError, match="000000/meta.json"):
        make_service(tmp_path).start()
