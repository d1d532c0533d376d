"""The stage skeleton's console: one line per event, library chatter silenced, trackers checked up front."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from pofa.recipe import RecipeError
from pofa.stage import check_trackers, configure_console, format_metrics, get_logger

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def test_loading_a_model_with_missing_heads_prints_no_report(tmp_path, capfd):
    BertModel(BertConfig(**TINY)).save_pretrained(tmp_path)  # no MLM head: transformers would print a LOAD REPORT
    configure_console()
    BertForMaskedLM.from_pretrained(tmp_path)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err
    assert "Loading weights" not in captured.err  # no progress bar per load


def test_log_lines_are_bare_and_on_the_main_process(capsys):
    from accelerate import PartialState

    PartialState()
    configure_console()
    get_logger().info("step 3: loss 0.5")
    assert capsys.readouterr().out == "step 3: loss 0.5\n"


def test_format_metrics_keeps_integers_whole():
    assert format_metrics({"loss": 0.123456, "masked_tokens": 76}) == "loss 0.1235 masked_tokens 76"


def test_a_tracker_that_is_not_installed_is_named():
    from accelerate.tracking import get_available_trackers

    if "wandb" in {str(kind.value) for kind in get_available_trackers()}:
        pytest.skip("wandb is installed here")
    with pytest.raises(RecipeError, match="training.trackers: wandb is not installed"):
        check_trackers(["wandb"])
    check_trackers(["tensorboard"])
