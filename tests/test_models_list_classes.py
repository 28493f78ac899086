"""`cl-agent models list`: the classes column tells the classes a version knows from its outputs."""

from typer.testing import CliRunner

from test_repository import fake_model

from cl_agent.cli import app
from cl_agent.repository import ModelRepository


def test_the_classes_column_shows_known_classes_out_of_the_outputs(tmp_path):
    root = tmp_path / "models"
    repo = ModelRepository(root, "student")
    # As the agent publishes: one name per output (model.num_classes = 10), the outputs no class
    # was given yet named by their index.
    seven = ["cat", "dog", "cup", "bowl", "fork", "5", "mug"] + ["7", "8", "9"]  # id 5 kept with no known name
    repo.publish(fake_model(tmp_path, b"a"), {"class_names": seven, "image_size": 16})
    repo.publish(fake_model(tmp_path, b"b"), {"class_names": ["cat", "dog", "cup"], "image_size": 16})
    listed = CliRunner().invoke(app, ["models", "list", "--repo", str(root), "--model", "student"])
    assert listed.exit_code == 0, listed.output
    header, *rows = listed.output.splitlines()
    column = header.split().index("classes") - 1  # the header says "created (UTC)" in two words
    assert [row.split()[column] for row in rows] == ["7/10", "3/3"]
