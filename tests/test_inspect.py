"""``imp-jax inspect`` on the real registry models gives the facts of models.md; errors are one line, exit 1."""

from __future__ import annotations

import pytest

from imp_jax.cli import main
from imp_jax.inspect import summarize
from imp_jax.weights.files import open_model_file

# name: (arch, layers, file bytes, tokenizer, chat template) from models.md
FACTS = {
    "smollm2-135m": ("llama", 30, 98_362_432, "gpt2", True),
    "gemma3-270m": ("gemma3", 18, 253_113_024, "llama", False),
    "qwen2.5-0.5b": ("qwen2", 24, 491_400_064, "gpt2", True),
    "qwen2.5-1.5b": ("qwen2", 28, 1_117_320_768, "gpt2", True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", FACTS)
def test_inspect_real_models(name, real_model, capsys):
    real_model(name)
    s = summarize(open_model_file(name))
    assert (s.arch, s.n_layers, s.file_bytes, s.tokenizer, s.chat_template) == FACTS[name]
    assert s.n_params > 100e6 and s.context_length >= 8192
    assert main(["inspect", name]) == 0
    out = capsys.readouterr().out
    assert f"architecture          {FACTS[name][0]}" in out and "bytes per quant type" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(40))
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imp-jax: error:") and str(bad) in err
    assert main(["inspect", "no-such-model"]) == 1
    assert "known names" in capsys.readouterr().err
