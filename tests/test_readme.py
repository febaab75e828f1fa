"""The README documents every sharpness-aware field of RWSAMConfig and the two set-up commands."""

import dataclasses
import re
from pathlib import Path

from transformers import TrainingArguments

from hf_rwsam import RWSAMConfig

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_table_lists_every_rwsam_config_field_with_its_default():
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README, re.MULTILINE))
    for f in dataclasses.fields(RWSAMConfig):
        if f.name not in base:
            assert f.name in rows, f"README's RWSAMConfig table misses {f.name}"
            assert rows[f.name] == repr(f.default), f"README says {f.name} defaults to {rows[f.name]}"


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README
