"""Run as a script by tests/unit/test_hf_export.py in a fresh interpreter (python -S) that cannot import titanlite:
reads exported Hugging Face folders with transformers alone and writes what it computed.

    python -S hf_reader.py JOBS.json

JOBS.json: {"site": [site-packages folders], "out": result.safetensors, "report": report.json,
            "models": [{"name", "folder", "dtype", "prompts": prompts.safetensors, "generate": bool}],
            "tokenizer": {"folder", "texts": [...]}}
"""

import json
import sys

jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
sys.path.extend(jobs["site"])  # -S skipped site-packages and their .pth files (an editable titanlite's finder)
report = {"sys_path": sys.path}
try:
    import titanlite  # noqa: F401
    report["titanlite_importable"] = True
except ImportError:
    report["titanlite_importable"] = False

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

torch.set_num_threads(1)
results = {}
report["models"] = {}
for job in jobs["models"]:
    dtype = getattr(torch, job["dtype"])
    model = AutoModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=True, dtype=dtype).eval()
    report["models"][job["name"]] = {"class": type(model).__name__, "module": type(model).__module__,
                                     "dtype": str(next(model.parameters()).dtype)}
    with torch.no_grad():
        for key, ids in load_file(job["prompts"]).items():
            results[f"{job['name']}/logits/{key}"] = model(ids).logits.float().contiguous()
            if job["generate"]:
                # eos_token_id=None: the comparison is 32 tokens whatever they are (<|bos|> included)
                new = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None)
                results[f"{job['name']}/generate/{key}"] = new[:, ids.size(1):].contiguous()
        if job.get("padded_batch"):  # two prompts in one batch, the shorter left-padded (pad id 0, masked out)
            short, long = (load_file(job["prompts"])[key][0] for key in job["padded_batch"])
            batch = torch.zeros(2, long.numel(), dtype=torch.long)
            mask = torch.zeros_like(batch)
            batch[0, -short.numel():], mask[0, -short.numel():] = short, 1
            batch[1], mask[1] = long, 1
            new = model.generate(batch, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            results[f"{job['name']}/padded_batch"] = new[:, long.numel():].contiguous()

if jobs.get("tokenizer"):
    spec = jobs["tokenizer"]
    tok = AutoTokenizer.from_pretrained(spec["folder"], trust_remote_code=True)
    encoded = [tok(text)["input_ids"] for text in spec["texts"]]
    report["tokenizer"] = {
        "class": type(tok).__name__,
        "ids": encoded,
        "ids_no_specials": [tok(text, add_special_tokens=False)["input_ids"] for text in spec["texts"]],
        "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in encoded],
        "decoded_with_specials": [tok.decode(ids) for ids in encoded],
        "special_ids": {name: tok.convert_tokens_to_ids(name) for name in spec["specials"]},
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "padded": tok(spec["texts"][:2], padding=True)["input_ids"],
        "padded_mask": tok(spec["texts"][:2], padding=True)["attention_mask"],
    }

report["titanlite_loaded_later"] = any(name.split(".")[0] == "titanlite" for name in sys.modules)
save_file(results, jobs["out"])
with open(jobs["report"], "w", encoding="utf-8") as f:
    json.dump(report, f)
