"""Messages that blame the right thing: a valid two-image record under the align stage's
caption recipe (the recipe once kept one ``<image>`` and the error blamed the record); a
resume that would change the data gets the resume refusal, not Hydra's ``+data.train`` hint;
a run whose ``config.yaml`` is not YAML is named, in one line."""

from __future__ import annotations

import json
import random

import pytest

from mmbridge.cli import main
from mmbridge.contracts.types import Sample, check_placeholders
from mmbridge.plugins.recipes.caption_pretrain import CaptionPretrainRecipe


def test_caption_recipe_keeps_one_placeholder_per_image():
    sample = Sample(
        id="two",
        media={"image": ["/a.png", "/b.png"]},
        conversations=[
            {"from": "human", "value": "<image>\n<image>\nCompare."},
            {"from": "gpt", "value": "Both are red squares."},
        ],
    )
    out = CaptionPretrainRecipe()(sample, random.Random(0))
    prompt = out.conversations[0]["value"]
    assert prompt.startswith("<image>\n<image>\n") and prompt.count("<image>") == 2
    check_placeholders(
        [(t["from"], t["value"]) for t in out.conversations], {"image": 2}, ["image"], "two"
    )
    assert out.conversations[1]["value"] == "Both are red squares."


@pytest.fixture
def started_run(tmp_path):
    """A run directory as a killed `mmbridge train` leaves it (the parts resume reads first)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\nrun_name: tiny\n")
    (run / "state.json").write_text(json.dumps({"stages_done": ["align"]}))
    return run


def test_resume_with_a_data_override_gets_the_resume_refusal(started_run, capsys, monkeypatch):
    monkeypatch.setenv("MMBRIDGE_DISABLE_PLUGINS", "1")
    rc = main(["train", f"resume={started_run}", "data.train=/elsewhere/train.json"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "+data.train" not in err
    assert (
        f"resume={started_run}: 1 override(s) cannot change a run that has started: "
        f"data.train=/elsewhere/train.json."
    ) in err
    assert "(done: align)" in err


def test_resume_of_a_run_whose_config_is_not_yaml(started_run, capsys, monkeypatch):
    monkeypatch.setenv("MMBRIDGE_DISABLE_PLUGINS", "1")
    (started_run / "config.yaml").write_text("seed: [0\n  run_name: : tiny\n")
    rc = main(["train", f"resume={started_run}"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err[-2000:]
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert f"{started_run / 'config.yaml'}: " in line
    assert "(expected the YAML mapping `mmbridge train` wrote)" in line


def test_resume_of_a_run_whose_state_is_damaged(started_run, capsys, monkeypatch):
    monkeypatch.setenv("MMBRIDGE_DISABLE_PLUGINS", "1")
    (started_run / "state.json").write_text('{"stages_done": ["align"')
    rc = main(["train", f"resume={started_run}"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err[-2000:]
    assert f"error: {started_run / 'state.json'}: JSONDecodeError: " in err


@pytest.mark.parametrize("content", ["{bad", "[1, 2]", '{"test": 5}'])
def test_report_of_a_run_with_a_damaged_metrics_file_names_it(tmp_path, content):
    from mmbridge.errors import DataError
    from mmbridge.reporting.run_report import write_run_report

    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(DataError, match=f"^{tmp_path / 'metrics.json'}"):
        write_run_report(tmp_path)
    assert not (tmp_path / "report.html").exists()
