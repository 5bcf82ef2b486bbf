"""The README stays true: every setting is documented, the quickstart's scripts exist."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from synerdiff.contract.config import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _env_names(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _env_names(ann, f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}"


def test_every_setting_has_a_row_in_the_configuration_table():
    missing = [env for env in _env_names(ServerSettings, "SYNERDIFF_") if f"`{env}`" not in README]
    assert missing == [], f"add these to README.md's configuration table: {missing}"


def test_quickstart_scripts_exist_and_are_executable():
    for script in ("scripts/serve.sh", "scripts/test.sh", ".ci/run"):
        assert os.access(ROOT / script, os.X_OK), script
    assert "scripts/serve.sh" in README and "scripts/test.sh" in README and ".ci/run" in README
    assert "(docs/api.md)" in README and (ROOT / "docs" / "api.md").is_file()
