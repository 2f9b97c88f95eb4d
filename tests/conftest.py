"""Shared fixtures: where the AN4 corpus lives, and a skip when it is absent."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AN4_DIR = Path(os.environ.get("AN4_DIR", REPO.parent / "shared" / "data" / "an4"))


@pytest.fixture(scope="session")
def an4_dir() -> Path:
    if not (AN4_DIR / "etc" / "an4_train.transcription").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"AN4 not found at {AN4_DIR}; CI must have ../shared/data/an4")
        pytest.skip(f"AN4 not found at {AN4_DIR} (set AN4_DIR)")
    return AN4_DIR


@pytest.fixture(scope="session")
def an4_data(an4_dir, tmp_path_factory) -> Path:
    """AN4 prepared once per session (features + BPE): see an4_fixture.prepared_an4."""
    from an4_fixture import prepared_an4

    return prepared_an4(tmp_path_factory.getbasetemp() / "an4_prepared", an4_dir)


@pytest.fixture(scope="session")
def an4_recipe_runs(an4_data, tmp_path_factory, request):
    """The AN4 models the selected test modules train with run.sh's recipe (an4_fixture.recipe_run), all started
    the first time one is asked for, so that they train side by side."""
    from an4_fixture import RecipeRuns

    selected = {str(Path(str(item.fspath)).resolve()) for item in request.session.items}
    runs = RecipeRuns(tmp_path_factory.mktemp("recipe_runs"), an4_data, selected)
    yield runs
    runs.stop()
