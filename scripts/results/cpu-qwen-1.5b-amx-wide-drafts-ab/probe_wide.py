"""Probe: a forward's cost at widths beyond 64 relative to one token, bf16 (routed) and float32, ~1000 cached."""
import sys, time, torch
import refdecode
from refdecode.policy import calibrate_costs
from transformers import DynamicCache
torch.set_num_threads(2)
dtype = sys.argv[1]
model, tok = refdecode.load_model("qwen2.5-coder-1.5b", dtype=dtype)
text = open("refdecode/policy.py").read()
ids = tok(text, return_tensors="pt").input_ids[:, :1000]
cache = DynamicCache(config=model.config)
with torch.no_grad():
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    widths = (1, 2, 16, 32, 33, 48, 64, 65, 96, 128, 129, 192, 256)
    t = calibrate_costs(model, cache, int(ids[0, -1]), widths=widths, rounds=3)
print(dtype, {w: round(t[w] / t[1], 2) for w in widths}, "one token", round(t[1], 3))
