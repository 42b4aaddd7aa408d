"""Config typos are rejected by the CLI with the closest valid key."""

from __future__ import annotations

import pytest

from conftest import CONFIG_DIR, run_opdlab


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("trainer:\n  max_step: 3\n", "'trainer.max_step': did you mean 'trainer.max_steps'"),
        ("model:\n  selectr: {class_path: opdlab.selectors.FullSelector}\n", "did you mean 'model.selector'"),
        ("model:\n  max_new_token: 4\n", "did you mean 'model.rollout.max_new_tokens'"),
    ],
)
def test_config_file_typo_names_the_closest_key(tmp_path, yaml_text, expected):
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml_text)
    result = run_opdlab(["fit", "--config", str(CONFIG_DIR / "fast.yaml"), "--config", str(typo), "--print_config"])
    assert result.code != 0
    assert expected in result.err


def test_command_line_typo_names_the_closest_key():
    result = run_opdlab(["fit", "--config", str(CONFIG_DIR / "fast.yaml"), "--model.rollout.max_new_tokns", "5", "--print_config"])
    assert result.code != 0
    assert "did you mean 'model.rollout.max_new_tokens'" in result.err
