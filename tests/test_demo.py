from typer.testing import CliRunner

from lwm_data import outputs
from lwm_data.cli import app
from lwm_data.validate import validate


def test_demo_runs_every_text_stage_into_valid_outputs(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--books", "4", "--words", "30000"])
    assert result.exit_code == 0, result.output
    for stage, directory in (("chunk", "chunks"), ("qa", "qa"), ("chat", "chat"), ("text", "text"), ("pack", "packed")):
        manifest = outputs.read_manifest(str(tmp_path / directory))
        assert manifest["stage"] == stage and manifest["counts"]["balanced"]
        assert manifest["counts"]["out"] > 0 and not validate(str(tmp_path / directory))
    tokenizers = [outputs.read_manifest(str(tmp_path / d))["tokenizer"] for d in ("chunks", "qa", "chat", "text", "packed")]
    assert all(t == tokenizers[0] for t in tokenizers) and tokenizers[0]["name"] == "default"  # by content, end to end
    rows = outputs.read_table(str(tmp_path / "packed"), ["tokens", "kinds"])
    assert {kind for kinds in rows["kinds"].to_pylist() for kind in kinds} == {"chat", "text"}
    assert len({len(tokens) for tokens in rows["tokens"].to_pylist()}) == 1
