"""GPU check (session 11): windowed QuantizedKVLayer (sliding-window layers) with the Triton
append on CUDA: every read equals the tail of an unwindowed layer's, and the zoo Gemma3 in bf16
gives the same logits and greedy tokens on a windowed cache. Run on the device machine after
`pip install --no-deps .`: `python benchmarks/check_windowed_cache_gpu.py` (writes $OUT/window_check.json)."""
import json, os, sys
import torch
from longfx.kernels.kv_quant import reference as R
from longfx.kernels.kv_quant import triton as KT
from longfx.runtime.cache import QuantizedKVLayer, QuantizedCache
from longfx.rewrite.testing import zoo

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
dev = "cuda"
for bits in (4, 2):
    config = R.KVQuantConfig(bits=bits, group=32, residual=32)
    full, win = QuantizedKVLayer(config, block=64), QuantizedKVLayer(config, block=64, window=100)
    g = torch.Generator(device=dev).manual_seed(bits)
    k = torch.randn(1, 8, 1200, 128, device=dev, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, 8, 1200, 128, device=dev, generator=g, dtype=torch.bfloat16)
    pos, worst = 0, 0.0
    for s in [77, 1, 1, 300] + [1] * 100 + [250, 1, 1, 180]:
        length, offset = win.get_mask_sizes(s)
        a = full.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        b = win.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        pos += s
        assert b[0].shape[2] == length and offset + length == pos
        worst = max(worst, float((b[0] - a[0][:, :, offset:]).abs().max()),
                    float((b[1] - a[1][:, :, offset:]).abs().max()))
    out[f"layer_bits{bits}"] = {"tokens": pos, "offset": win.offset, "held": win.length,
                                "max_abs_diff_vs_unwindowed_tail": worst,
                                "bytes_windowed": win.nbytes(), "bytes_unwindowed": full.nbytes(),
                                "triton_append": KT.supports_append(win.state, k[:, :, :1], v[:, :, :1])}
model, _ = zoo.build("gemma3")
model = model.to(dev, torch.bfloat16)
config = R.KVQuantConfig(bits=4, group=32, residual=32)
ids = torch.randint(3, 120, (1, 160), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
with torch.no_grad():
    a = torch.cat([model(input_ids=ids[:, s:s + 40], past_key_values=c, use_cache=True).logits
                   for c in [QuantizedCache(config)] for s in range(0, 160, 40)], 1)
    w = QuantizedCache(config, model.config)
    b = torch.cat([model(input_ids=ids[:, s:s + 40], past_key_values=w, use_cache=True).logits
                   for s in range(0, 160, 40)], 1)
    kw = dict(input_ids=ids[:, :64], max_new_tokens=64, do_sample=False)
    want = model.generate(**kw, past_key_values=QuantizedCache(config))
    got = model.generate(**kw, past_key_values=QuantizedCache(config, model.config))
out["zoo_gemma3_bf16"] = {"logits_max_abs_diff": float((a - b).abs().max()),
                          "logits_max_abs": float(a.abs().max()),
                          "generate_equal": bool(torch.equal(got, want)),
                          "sliding_offset": w.layers[0].offset}
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "window_check.json"), "w"), indent=1)
