"""`python -m fastattn`: every bad input is one line on stderr ("fastattn: error: ...") and a
non-zero exit, never a traceback; unexpected errors show one line unless FASTATTN_DEBUG=1.

The reported cases run the CLI in a subprocess, all at once (each one imports torch, ~2 s);
the rest of the matrix calls `fastattn.__main__.main` in-process, which goes through the
same error handling. The checkpoint is a hand-written one-layer LLaMA (vocab 64), so
nothing here needs transformers and every generate call is quick."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastattn
from fastattn import __main__ as cli

VOCAB, MAX_POS = 64, 32
PAGED_PROMPT = "3 14 15 9 26"  # the tiny model continues it with varied tokens and no eos
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_OK = fastattn.cuda_built() and torch.cuda.is_available()
PAGED_KERNELS = hasattr(fastattn, "attention_with_kvcache")
PAGED_BACKEND = "fastattn" if PAGED_KERNELS else "torch"


def write_tiny_llama(folder) -> str:
    """config.json + model.safetensors (Hugging Face names) + generation_config.json."""
    from safetensors.torch import save_file

    hidden, inter, heads, kv_heads = 32, 48, 2, 1
    head_dim = hidden // heads
    os.makedirs(folder, exist_ok=True)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=hidden,
                  intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=MAX_POS, rms_norm_eps=1e-6,
                  hidden_act="silu", tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 2}, f)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    p = "model.layers.0."
    state = {
        "model.embed_tokens.weight": w(VOCAB, hidden), "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": w(VOCAB, hidden),
        p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
        p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
        p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
        p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
        p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
        p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
        p + "mlp.down_proj.weight": w(hidden, inter),
    }
    save_file(state, os.path.join(folder, "model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


def copy_of(model_dir, dest, **replace):
    """A folder linking model_dir's files, except those given in `replace` (name -> text or None)."""
    dest.mkdir()
    for name in os.listdir(model_dir):
        if name not in replace:
            os.symlink(os.path.join(model_dir, name), dest / name)
    for name, text in replace.items():
        if text is not None:
            (dest / name).write_text(text)
    return str(dest)


def assert_one_line_error(rc, out, err, *fragments, code=2):
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("fastattn: error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    assert rc == code, f"exit code {rc}, expected {code}; stderr: {err}"
    assert out == "", f"nothing should reach stdout on an error, got {out!r}"


# ---- subprocess: the reported cases, run concurrently -------------------------------------
def _subprocess_cases(model_dir):
    return {
        "token_out_of_vocab": ["generate", "--model", model_dir, "--prompt", f"5 {VOCAB + 100}", "--device", "cpu"],
        "generate_cuda": ["generate", "--model", model_dir, "--prompt", "5", "--device", "cuda"],
        "demo_cuda": ["demo", "--device", "cuda"],
        "negative_new_tokens": ["generate", "--model", model_dir, "--prompt", "5", "--max-new-tokens", "-1"],
        "ok": ["generate", "--model", model_dir, "--prompt", "5 6 7", "--max-new-tokens", "3", "--device", "cpu"],
        "paged": ["generate", "--model", model_dir, "--prompt", PAGED_PROMPT, "--max-new-tokens", "8", "--device", "cpu",
                  "--cache", "paged", "--page-size", "16", "--backend", PAGED_BACKEND],
        "paged_contiguous": ["generate", "--model", model_dir, "--prompt", PAGED_PROMPT, "--max-new-tokens", "8",
                             "--device", "cpu", "--cache", "contiguous", "--backend", PAGED_BACKEND],
    }


@pytest.fixture(scope="module")
def runs(model_dir):
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_DEBUG"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")

    def run(argv):
        return subprocess.run([sys.executable, "-m", "fastattn", *argv], capture_output=True, text=True,
                              timeout=120, env=env, cwd=ROOT)

    cases = _subprocess_cases(model_dir)
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        done = dict(zip(cases, pool.map(run, cases.values())))
    return done


def _check_run(r, *fragments, code=2):
    assert_one_line_error(r.returncode, r.stdout, r.stderr, *fragments, code=code)


def test_subprocess_token_id_out_of_vocab(runs):
    _check_run(runs["token_out_of_vocab"], "--prompt", str(VOCAB + 100), f"vocab_size {VOCAB}")


@pytest.mark.skipif(CUDA_OK, reason="a CUDA build with a GPU accepts --device cuda")
@pytest.mark.parametrize("case", ["generate_cuda", "demo_cuda"])
def test_subprocess_device_cuda_without_cuda(runs, case):
    expected = "no CUDA kernels (CPU-only build)" if not fastattn.cuda_built() else "no CUDA device"
    _check_run(runs[case], "--device cuda", expected)


def test_subprocess_negative_max_new_tokens(runs):
    _check_run(runs["negative_new_tokens"], "--max-new-tokens", ">= 1", "-1")


def test_subprocess_success_unchanged(runs, model_dir):
    r = runs["ok"]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    ids = [int(t) for t in r.stdout.split()]
    assert ids[:3] == [5, 6, 7] and 3 < len(ids) <= 6 and all(0 <= t < VOCAB for t in ids)
    assert "new tokens in" in r.stderr


def test_subprocess_paged_cache_same_tokens(runs):
    paged, contiguous = runs["paged"], runs["paged_contiguous"]
    assert paged.returncode == 0 and contiguous.returncode == 0, paged.stderr + contiguous.stderr
    assert "Traceback" not in paged.stderr
    ids = [int(t) for t in paged.stdout.split()]
    assert ids[:5] == [3, 14, 15, 9, 26] and len(ids) == 13
    assert paged.stdout == contiguous.stdout
    assert "paged KV cache: 1 pages of 16 tokens" in paged.stderr  # 5 + 7 tokens held
    assert "paged KV cache" not in contiguous.stderr


# ---- in-process: the whole matrix ---------------------------------------------------------
def run_main(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def check(argv, capsys, *fragments, code=2):
    rc, out, err = run_main(argv, capsys)
    assert_one_line_error(rc, out, err, *fragments, code=code)


def gen(model_dir, *extra, prompt="5 6 7"):
    return ["generate", "--model", model_dir, "--prompt", prompt, "--max-new-tokens", "4", "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, fragments", [
    (["--max-new-tokens", "-1"], ["--max-new-tokens", ">= 1"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["--max-new-tokens", "ten"], ["--max-new-tokens", "'ten'"]),
    (["--max-new-tokens", "40"], ["--max-new-tokens", "max_position_embeddings", str(MAX_POS)]),
    (["--temperature", "-0.5"], ["--temperature", ">= 0"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--temperature", "inf"], ["--temperature", "inf"]),
    (["--top-k", "0"], ["--top-k", ">= 1"]),
    (["--top-k", "-3"], ["--top-k", ">= 1"]),
    (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["--top-p", "nan"], ["--top-p", "(0, 1]"]),
    (["--seed", str(2 ** 64)], ["--seed", str(2 ** 64)]),
    (["--seed", "1.5"], ["--seed", "'1.5'"]),
    (["--dtype", "int8"], ["--dtype", "'int8'"]),
    (["--device", "tpu"], ["--device", "'tpu'"]),
    (["--backend", "jax"], ["--backend", "'jax'"]),
    (["--bogus"], ["--bogus", "python -m fastattn generate --help"]),
    (["--cache", "paged", "--page-size", "0"], ["--page-size", ">= 1", "got 0"]),
    (["--cache", "paged", "--page-size", "-4"], ["--page-size", ">= 1", "got -4"]),
    (["--page-size", "16.5"], ["--page-size", "'16.5'"]),
    (["--cache", "ring"], ["--cache", "'ring'", "contiguous", "paged"]),
    (["--num-beams", "0"], ["--num-beams", ">= 1"]),
    (["--num-beams", "4", "--temperature", "0.7"], ["--num-beams", "deterministic", "--temperature"]),
    (["--num-beams", "2", "--num-return-sequences", "3"], ["--num-return-sequences 3", "--num-beams"]),
    (["--early-stopping", "maybe"], ["--early-stopping", "true, false or never"]),
    (["--length-penalty", "nan"], ["--length-penalty", "finite"]),
    (["--repetition-penalty", "0"], ["--repetition-penalty", "> 0"]),
    (["--min-new-tokens", "-1"], ["--min-new-tokens", ">= 0"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None)
def test_generate_bad_option_values(model_dir, capsys, extra, fragments):
    check(gen(model_dir, *extra), capsys, *fragments)


@pytest.mark.parametrize("prompt, fragments", [
    ("", ["--prompt", "no tokens"]),
    ("   ", ["--prompt", "no tokens"]),
    ("5 six 7", ["--prompt", "'six'", "token ids"]),
    (f"5 {VOCAB}", ["--prompt", str(VOCAB), f"vocab_size {VOCAB}"]),
    ("5 -3", ["--prompt", "-3", f"vocab_size {VOCAB}"]),
    (" ".join(["7"] * (MAX_POS + 1)), ["--prompt", f"{MAX_POS + 1} tokens", "max_position_embeddings"]),
], ids=["empty", "blank", "not_an_id", "id_eq_vocab", "negative_id", "too_long"])
def test_generate_bad_prompts(model_dir, capsys, prompt, fragments):
    check(gen(model_dir, prompt=prompt), capsys, *fragments)


def test_generate_up_to_max_position_embeddings(model_dir, capsys):
    # The last new token is printed, never fed back: a prompt of S tokens and n new ones need
    # S + n - 1 positions (transformers' generate runs these too; they were refused before).
    rc, out, err = run_main(gen(model_dir, "--max-new-tokens", "1", prompt=" ".join(["7"] * MAX_POS)), capsys)
    assert rc == 0, err
    assert len(out.split()) == MAX_POS + 1
    rc, out, err = run_main(gen(model_dir, "--max-new-tokens", str(MAX_POS - 2)), capsys)  # 3 + 30 - 1 = 32
    assert rc == 0, err
    assert len(out.split()) == MAX_POS + 1
    check(gen(model_dir, "--max-new-tokens", str(MAX_POS - 1)), capsys, "--max-new-tokens", "33 positions",
          f"--max-new-tokens {MAX_POS - 2} or fewer")


def test_generate_model_folder_errors(model_dir, tmp_path, capsys):
    check(gen(str(tmp_path / "nope")), capsys, "--model", "no such folder")
    (tmp_path / "a_file").write_text("x")
    check(gen(str(tmp_path / "a_file")), capsys, "--model", "not a folder")
    (tmp_path / "empty").mkdir()
    check(gen(str(tmp_path / "empty")), capsys, "--model", "no config.json")
    bad_json = copy_of(model_dir, tmp_path / "bad_json", **{"config.json": "{not json"})
    check(gen(bad_json), capsys, "--model", "config.json")
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    gpt2 = copy_of(model_dir, tmp_path / "gpt2", **{"config.json": json.dumps({**cfg, "model_type": "gpt2"})})
    check(gen(gpt2), capsys, "--model", "config.json", "unsupported architecture")
    zero_heads = copy_of(model_dir, tmp_path / "zero_heads",
                         **{"config.json": json.dumps({**cfg, "num_attention_heads": 0})})
    check(gen(zero_heads), capsys, "--model", "config.json", "num_attention_heads")
    as_list = copy_of(model_dir, tmp_path / "as_list", **{"config.json": "[1, 2]"})
    check(gen(as_list), capsys, "--model", "config.json")
    no_weights = copy_of(model_dir, tmp_path / "no_weights", **{"model.safetensors": None})
    check(gen(no_weights), capsys, "--model", "safetensors")
    bad_weights = copy_of(model_dir, tmp_path / "bad_weights", **{"model.safetensors": "garbage"})
    check(gen(bad_weights), capsys, "--model", "safetensors")
    two_layers = copy_of(model_dir, tmp_path / "two_layers",
                         **{"config.json": json.dumps({**cfg, "num_hidden_layers": 2})})
    check(gen(two_layers), capsys, "--model", "model.layers.1")
    bad_gen = copy_of(model_dir, tmp_path / "bad_gen", **{"generation_config.json": '{"eos_token_id": "end"}'})
    check(gen(bad_gen), capsys, "--model", "generation_config.json", "eos_token_id")


def test_generate_tokenizer_errors(model_dir, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["huge"] = VOCAB + 10  # a tokenizer that does not fit the checkpoint
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder = copy_of(model_dir, tmp_path / "with_tok", **{"tokenizer.json": tok.to_str()})
    check(gen(folder, prompt="   "), capsys, "--prompt", "no tokens")
    check(gen(folder, prompt="w5 huge"), capsys, "--prompt", str(VOCAB + 10), "tokenizer.json")
    broken = copy_of(model_dir, tmp_path / "broken_tok", **{"tokenizer.json": "{}"})
    check(gen(broken, prompt="w5"), capsys, "--model", "tokenizer.json")
    # and a good prompt still works
    rc, out, err = run_main(gen(folder, "--max-new-tokens", "2", prompt="w5 w6"), capsys)
    assert rc == 0 and out.startswith("w5 w6"), err
    # --token-ids: the same prompt given as ids, though the folder has a tokenizer (without the
    # flag '5 6' is text, which this vocabulary maps to the unknown token w0)
    rc, ids_out, err = run_main(gen(folder, "--max-new-tokens", "2", "--token-ids", prompt="5 6"), capsys)
    assert rc == 0 and ids_out == out, err
    check(gen(folder, "--token-ids", prompt="w5 w6"), capsys, "--prompt", "'w5'", "with --token-ids")


@pytest.mark.skipif(CUDA_OK, reason="a CUDA build with a GPU accepts --device cuda")
@pytest.mark.parametrize("sub", ["generate", "demo"])
def test_device_cuda_without_cuda(model_dir, capsys, sub):
    argv = gen(model_dir)[:-2] + ["--device", "cuda"] if sub == "generate" else ["demo", "--device", "cuda"]
    expected = "no CUDA kernels (CPU-only build)" if not fastattn.cuda_built() else "no CUDA device"
    check(argv, capsys, "--device cuda", expected)


def test_demo_and_top_level_usage_errors(capsys):
    check(["demo", "--device", "tpu"], capsys, "--device", "'tpu'")
    check([], capsys, "command")
    check(["train"], capsys, "'train'")
    check(["info", "--verbose"], capsys, "--verbose")


def test_bench_path_errors(tmp_path, capsys, monkeypatch):
    from fastattn.benchmarks import runner

    monkeypatch.setattr(runner, "run_suites", lambda *a, **k: pytest.fail("bench ran despite a bad argument"))
    check(["bench", "--out", str(tmp_path)], capsys, "--out", "is a folder")
    check(["bench", "--plot", str(tmp_path / "missing" / "p.png")], capsys, "--plot", "no such folder")
    (tmp_path / "f").write_text("")
    check(["bench", "--out", str(tmp_path / "f" / "r.json")], capsys, "--out", "not a folder")
    # more bench cases (reports, plots, real tiny runs) are in tests/test_bench.py


# ---- progress on stderr, tables on stdout ------------------------------------------------------
def _tiny_demo_setup(device):
    from fastattn.models import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return config, torch.float32, 2, [8, 6], 4


@pytest.mark.parametrize("tty", [True, False], ids=["stderr_tty", "stderr_log"])
def test_demo_progress_never_reaches_stdout(monkeypatch, capsys, tty):
    """Bars (a terminal) or one plain line per step (a log) go to stderr only; stdout holds
    whole table lines, none glued to a bar."""
    pytest.importorskip("tqdm")
    monkeypatch.setattr(cli, "_demo_setup", _tiny_demo_setup)
    monkeypatch.setattr(cli, "_stderr_is_tty", lambda: tty)
    rc, out, err = run_main(["demo", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "\r" not in out and "it/s" not in out and "%|" not in out
    for name in ("warm-up", "decode fastattn", "per-op timing"):
        assert name not in out and name in err
    op_lines = [ln for ln in out.splitlines() if ln.split()[:1] and ln.split()[0] in
                ("rms_norm+residual", "apply_rotary", "flash_attention", "append_kv", "decode_attention")]
    assert len(op_lines) == 5 and all(ln.split()[-1].endswith(("x", "ms")) for ln in op_lines), out
    assert "agreement" in out and "OK" in out
    try:
        import transformers  # noqa: F401
    except ImportError:
        assert "Against transformers: skipped" in out
    else:  # the four ways of running the same checkpoint, each generating transformers+sdpa's tokens
        ways = [ln for ln in out.splitlines() if ln.startswith(("our model, ", "transformers, attn_implementation"))]
        assert len(ways) == 4 and all(ln.endswith("100.0%") for ln in ways), out
        assert "x transformers+sdpa" in out and "generate rounds" in err
    if tty:
        assert "\r" in err  # a real bar was drawn (and cleared)
    else:
        assert "\r" not in err and all(ln.endswith("...") for ln in err.splitlines() if ln.strip()), err


def test_generate_warns_when_sampling_options_are_ignored(model_dir, capsys):
    rc, out, err = run_main(gen(model_dir, "--top-k", "5"), capsys)
    assert rc == 0 and out.split()[:3] == ["5", "6", "7"]
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("fastattn: warning: --top-k ignored")
    assert "--temperature 0" in warnings[0] and "greedy" in warnings[0]
    rc, out, err = run_main(gen(model_dir, "--top-k", "5", "--top-p", "0.9", "--temperature", "0"), capsys)
    assert rc == 0 and "--top-k and --top-p ignored" in err
    rc, out, err = run_main(gen(model_dir, "--top-p", "0.9", "--temperature", "0.7", "--seed", "1"), capsys)
    assert rc == 0 and "warning" not in err
    rc, out, err = run_main(gen(model_dir), capsys)
    assert rc == 0 and "warning" not in err
    # the warning comes after every check: a bad input still gives exactly one line
    check(gen(model_dir, "--top-k", "5", prompt="5 x"), capsys, "--prompt", "'x'")


@pytest.mark.parametrize("backend", [
    pytest.param("fastattn", marks=pytest.mark.skipif(not PAGED_KERNELS, reason="no paged-cache kernels in this build")),
    "torch"])
def test_generate_paged_cache_same_tokens(model_dir, capsys, backend):
    argv = gen(model_dir, "--backend", backend, "--max-new-tokens", "8", prompt=PAGED_PROMPT)
    rc, contiguous, err = run_main(argv, capsys)
    assert rc == 0 and "paged" not in err
    assert len(set(contiguous.split()[5:])) >= 3  # a varied continuation: a cache bug would show
    for page_size, pages in (("1", 12), ("3", 4), ("16", 1)):  # 5 prompt + 7 appended tokens held
        rc, out, err = run_main(argv + ["--cache", "paged", "--page-size", page_size], capsys)
        assert rc == 0, err
        assert out == contiguous
        assert f"paged KV cache: {pages} pages of {page_size} tokens" in err


def test_generate_paged_cache_without_kernels_is_a_usage_error(model_dir, capsys, monkeypatch):
    import fastattn.models.llama as llama

    monkeypatch.setattr(llama, "paged_kernels_available", lambda: False)
    check(gen(model_dir, "--cache", "paged"), capsys, "--cache paged", "--backend torch")
    rc, out, err = run_main(gen(model_dir, "--cache", "paged", "--backend", "torch"), capsys)
    assert rc == 0 and out.split()[:3] == ["5", "6", "7"], err


def test_generate_without_safetensors_is_a_usage_error(model_dir, capsys, monkeypatch):
    # safetensors is an optional dependency (it comes with transformers, not with fastattn): a
    # user without it gets the pip line and exit 2, not an "unexpected" internal error.
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    check(gen(model_dir), capsys, "safetensors", "pip install safetensors")


def test_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys):
    def boom(args=None):
        raise RuntimeError("kernel exploded\nsecond line of detail")

    monkeypatch.setattr(cli, "cmd_info", boom)
    monkeypatch.delenv("FASTATTN_DEBUG", raising=False)
    check(["info"], capsys, "RuntimeError: kernel exploded", "FASTATTN_DEBUG=1", code=1)
    monkeypatch.setenv("FASTATTN_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        cli.main(["info"])


def test_help_documents_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "FASTATTN_DEBUG" in out and "exit" in out


def test_info_names_the_cpu_kernel_isa(capsys):
    import fastattn

    assert cli.main(["info"]) in (0, None)
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("cpu isa")]
    assert len(line) == 1 and line[0].split()[2] == fastattn.cpu_isa(), out


def test_generate_beam_search_and_penalties(model_dir, capsys):
    """The flags reach Llama.generate: the printed beams are generate's, best first, each cut
    after its eos."""
    from fastattn.models import Llama

    argv = gen(model_dir, "--num-beams", "3", "--num-return-sequences", "2", "--length-penalty", "0.5",
               "--early-stopping", "never", "--repetition-penalty", "1.3", "--min-new-tokens", "2",
               "--max-new-tokens", "6", prompt=PAGED_PROMPT)
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, err
    expected = Llama.from_pretrained(model_dir).generate(
        torch.tensor([[int(t) for t in PAGED_PROMPT.split()]]), 6, eos_token_id=2, num_beams=3,
        num_return_sequences=2, length_penalty=0.5, early_stopping="never", repetition_penalty=1.3, min_new_tokens=2)
    lines = out.splitlines()
    assert len(lines) == 2
    for line, row in zip(lines, expected.tolist()):
        toks = [int(t) for t in line.split()]
        assert toks == row[:len(toks)] and all(t == 2 for t in row[len(toks):])
    rc, plain, _ = run_main(gen(model_dir, "--repetition-penalty", "1.0", prompt=PAGED_PROMPT), capsys)
    rc2, again, _ = run_main(gen(model_dir, prompt=PAGED_PROMPT), capsys)
    assert rc == rc2 == 0 and plain == again


def test_unbuilt_package_error_is_one_line_on_the_command_line(monkeypatch, capsys):
    # `python -m fastattn ...` imports the package before main() can catch anything: an
    # unbuilt checkout printed two chained tracebacks (~20 lines) where the CLI promises one
    # line and a non-zero exit (newcomer audit). In a plain `import fastattn` it stays an
    # ImportError with the message.
    from fastattn import _C_loader

    error = ImportError("fastattn's compiled extension is not built. Build it with:\n    pip install -e .")
    monkeypatch.delenv("FASTATTN_DEBUG", raising=False)
    for argv0 in ("-m", "/usr/local/bin/fastattn"):
        monkeypatch.setattr(sys, "argv", [argv0, "info"])
        with pytest.raises(SystemExit) as exit_info:
            _C_loader.exit_if_command_line(error)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err == "fastattn: error: fastattn's compiled extension is not built. Build it with: pip install -e .\n"
    monkeypatch.setattr(sys, "argv", ["script.py"])
    _C_loader.exit_if_command_line(error)  # not the command line: returns, the caller re-raises
    monkeypatch.setattr(sys, "argv", ["-m", "info"])
    monkeypatch.setenv("FASTATTN_DEBUG", "1")
    _C_loader.exit_if_command_line(error)  # the traceback wanted


def test_missing_extension_error_has_no_circular_import_hint(monkeypatch):
    # A missing _C file surfaces from Python as "cannot import name '_C' from partially
    # initialized module 'fastattn' (most likely due to a circular import)": appended as the
    # "original error", it sent a newcomer looking for a circular import (newcomer audit).
    import builtins

    from fastattn import _C_loader

    real_import = builtins.__import__

    def no_extension(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "fastattn" and fromlist and "_C" in fromlist:
            raise ImportError("cannot import name '_C' from partially initialized module 'fastattn' (most likely "
                              "due to a circular import) (/x/fastattn/__init__.py)", name="fastattn")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_extension)
    with pytest.raises(ImportError) as error:
        _C_loader.load()
    assert "not built" in str(error.value) or "source checkout" in str(error.value)
    assert "circular" not in str(error.value)
