"""Records how mergekit 0.1.5 itself resolves recipes, for tests/recipes.rs (which needs no PyTorch).

For each recipe in RECIPES, on tiny Llama checkpoints made here, this runs mergekit's own merge
(`mergekit.merge.run_merge`, CPU) and records what its planner decided per output tensor: which
tensor of which model feeds it, and every parameter value after filters, gradients and
precedence (mergekit's `ExecuteMergeMethodTask.parameters` / `input_parameters`). It records the
output's config.json fields, tensor dtypes and tokenizer/chat-template result too. The checkpoints'
layouts (names, shapes, dtypes, configs) go into the fixture so the Rust test can rebuild them.

It also checks stamerge's named chat templates (src/recipe/chat_templates/) against mergekit's:
both rendered with transformers' chat-template renderer on a set of conversations must give the
same text; the fixture records the text of each stamerge file it checked.

With STAMERGE=path/to/stamerge it also runs stamerge on every recipe whose method stamerge has and
compares the outputs with mergekit's (passthrough: bit for bit; merges: within the rounding of
mergekit's own arithmetic) and loads the frankenmerges with transformers. It prints that
comparison; the fixture does not depend on it.

usage: python benches/peers/mergekit_fixture.py tests/fixtures/mergekit_0.1.5.json
       (in a venv with mergekit==0.1.5 and torch from PyPI, e.g. /work/venvs/mergekit)
"""

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

import mergekit
import mergekit.merge
import mergekit.plan
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS = 5
HIDDEN, INTER, VOCAB = 8, 16, 32

# The models: a base and three fine-tunes of one tiny Llama; `m_bf16` stores bfloat16.
MODELS = {
    "base": ("float32", 0),
    "m0": ("float32", 1),
    "m1": ("float32", 2),
    "m2": ("float32", 3),
    "m_bf16": ("bfloat16", 4),
}

# mergekit's examples/ties.yml with local paths (the hub names mapped to the models above).
TIES_EXAMPLE = """models:
  - model: m0
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: m1
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: m2
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

# examples/orcamini-platy-44layer.yml's shape: two overlapping slices of two models.
FRANKEN = """slices:
  - sources:
    - model: m0
      layer_range: [0, 3]
  - sources:
    - model: m1
      layer_range: [2, 5]
merge_method: passthrough
dtype: float16
"""

# mergekit's examples/gradient-slerp.yml with local paths (orca → m0, platypus → m1, 5 layers).
SLERP_EXAMPLE = """slices:
  - sources:
      - model: m0
        layer_range: [0, 5]
      - model: m1
        layer_range: [0, 5]
# or, the equivalent models: syntax:
# models:
#   - model: m0
#   - model: m1
merge_method: slerp
base_model: m0
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""

# mergekit's examples/linear.yml with local paths (orca → m0, WizardLM → m2, platypus → m1).
LINEAR_EXAMPLE = """models:
  - model: m0
    parameters:
      weight: 1.0
  - model: m2
    parameters:
      weight: 0.3
  - model: m1
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

# The interpolating methods (issue 17), computing in float32 as stamerge does.
INTERP = {
    "linear_base": """models:
  - model: m0
    parameters:
      weight: 0.5
  - model: base
    parameters:
      weight: [0.25, 1]
  - model: m1
merge_method: linear
base_model: base
parameters:
  weight: 0.75
  normalize:
    - filter: layernorm
      value: false
    - value: true
dtype: float32
""",
    "slerp_models": """models:
  - model: base
  - model: m1
merge_method: slerp
base_model: base
parameters:
  t: [0, 0.3, 1]
dtype: float32
""",
    "nuslerp_base_rows": """models:
  - model: m0
    parameters:
      weight: 0.3
  - model: m1
    parameters:
      weight: [0.2, 0.9]
merge_method: nuslerp
base_model: base
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise:
    - filter: mlp
      value: true
    - value: false
dtype: float32
""",
    "nuslerp_flat": """models:
  - model: m0
    parameters:
      weight: 1.0
  - model: m2
    parameters:
      weight: 3.0
merge_method: nuslerp
dtype: float32
""",
    "multislerp": """models:
  - model: m0
    parameters:
      weight: 1.0
  - model: m1
    parameters:
      weight: [0.5, 2]
  - model: m2
    parameters:
      weight: 0.7
merge_method: multislerp
base_model: base
parameters:
  eps: 1e-7
dtype: float32
""",
    "karcher": """models:
  - model: m0
  - model: m1
  - model: m2
merge_method: karcher
base_model: base
parameters:
  max_iter: 20
  tol: [1e-6, 1e-4]
dtype: float32
""",
    "model_stock": """models:
  - model: m0
  - model: m1
  - model: m2
merge_method: model_stock
base_model: base
parameters:
  filter_wise:
    - filter: mlp
      value: true
    - value: false
dtype: float32
""",
    "nearswap": """models:
  - model: m0
merge_method: nearswap
base_model: base
parameters:
  t: [0.02, 0.1]
dtype: float32
""",
    "arcee_fusion": """models:
  - model: m1
merge_method: arcee_fusion
base_model: base
dtype: float32
""",
}

RECIPES = {
    "ties_example": TIES_EXAMPLE,
    "gradient_slerp_example": SLERP_EXAMPLE,
    "linear_example": LINEAR_EXAMPLE,
    **INTERP,
    "franken": FRANKEN,
    # Gradients of several lengths, strings that are numbers, a boolean list (picked, not
    # interpolated), filters with `*`, a filter that matches nothing (falls through to the
    # global scope), a filter whose value is a gradient, an empty filter string.
    "gradients": """models:
  - model: m0
    parameters:
      weight: [0.2, 1.5]
      density: ["1e-1", 0.9, "0.5"]
  - model: m1
    parameters:
      weight:
        - filter: self_attn.q_proj
          value: [1, 0, 1]
        - filter: "*"
          value: 0.25
  - model: m2
    parameters:
      weight:
        - filter: no_such_tensor
          value: 9
      density: []
merge_method: dare_ties
base_model: base
parameters:
  weight: 0.75
  density:
    - filter: mlp
      value: [0.9, 0.2, 0.6, 0.3]
    - filter: ""
      value: 0.8
  lambda: [1, 2]
  normalize: [true, false, true]
  rescale:
    - filter: layernorm
      value: false
    - value: true
""",
    # Precedence in slices: slice source > output slice > top level, per-slice positions, source
    # layers offset from the output's.
    "slices_ties": """slices:
  - sources:
      - model: base
        layer_range: [0, 3]
      - model: m0
        layer_range: [1, 4]
        parameters:
          weight: [0.1, 0.9]
      - model: m1
        layer_range: [2, 5]
    parameters:
      weight: 0.6
      density: [0.3, 0.8]
  - sources:
      - model: base
        layer_range: [3, 5]
      - model: m0
        layer_range: [3, 5]
      - model: m1
        layer_range: [0, 2]
        parameters:
          density:
            - filter: mlp
              value: 0.45
    parameters:
      lambda: 1.5
merge_method: ties
base_model: base
parameters:
  weight: 0.3
  density: 0.7
  lambda: [0.5, 1.0]
  normalize: false
""",
    # A model in one slice only: the other slice merges without it; the tensors before the layers
    # come from the first slice's models, those after from the last's.
    "slices_absent": """slices:
  - sources:
      - model: base
        layer_range: [0, 2]
      - model: m0
        layer_range: [0, 2]
      - model: m1
        layer_range: [0, 2]
  - sources:
      - model: base
        layer_range: [2, 5]
      - model: m2
        layer_range: [2, 5]
merge_method: ties
base_model: base
parameters:
  weight: [1, 0.5]
  density: 0.6
""",
    # A one-layer slice (t = 1 there), repeated layers, and passthrough's `scale` by filter.
    "franken_scale": """slices:
  - sources:
      - model: m0
        layer_range: [0, 2]
  - sources:
      - model: m0
        layer_range: [1, 2]
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - filter: down_proj
              value: [0.5, 1]
            - value: 1.0
  - sources:
      - model: m1
        layer_range: [1, 5]
merge_method: passthrough
""",
    # Models listed with the base among them, per-model parameters over the global ones.
    "task_arithmetic_models": """models:
  - model: base
  - model: m0
    parameters:
      weight: [1, 0.5, 0.25]
  - model: m1
merge_method: task_arithmetic
base_model: base
parameters:
  weight: 0.4
  lambda: 0.9
""",
    # The output dtype without dtype/out_dtype: mergekit promotes mixed inputs (a bfloat16 base,
    # a float32 model: float32), stamerge keeps the base's and warns.
    "mixed_dtypes": """models:
  - model: m0
    parameters:
      weight: 1.0
merge_method: task_arithmetic
base_model: m_bf16
""",
    # Issue 17's sparsifying methods: della's per-model epsilon by filter and gradient (checked
    # with the density for every tensor), breadcrumbs' gamma, sce's and ram's shared values, and
    # DARE's defaults (dare_ties: rescale true, normalize false).
    "della_values": """models:
  - model: m0
    parameters:
      weight: 1.0
      density: [0.3, 0.6]
      epsilon: 0.1
  - model: m1
    parameters:
      weight: [0.5, 1.0]
      density: 0.5
merge_method: della
base_model: base
parameters:
  epsilon:
    - filter: mlp
      value: 0.2
    - value: 0.05
  lambda: 0.9
""",
    "breadcrumbs_values": """models:
  - model: m0
    parameters:
      weight: 0.6
      density: 0.8
      gamma: [0.0, 0.1]
  - model: m1
    parameters:
      weight: 0.4
merge_method: breadcrumbs_ties
base_model: base
parameters:
  density: 0.7
  gamma:
    - filter: self_attn
      value: 0.05
    - value: 0.02
  rescale: true
""",
    "sce_values": """models:
  - model: m0
  - model: m1
  - model: m2
merge_method: sce
base_model: base
parameters:
  select_topk: [0.2, 0.8]
""",
    "ramplus_values": """models:
  - model: m0
  - model: m1
merge_method: ramplus_tl
base_model: base
parameters:
  epsilon: 0.001
  r: [0.1, 0.5]
  alpha: 0.3
""",
    "dare_defaults": """models:
  - model: m0
    parameters:
      weight: 0.7
      density: 0.5
  - model: m1
    parameters:
      weight: 0.3
      density: 0.4
merge_method: dare_ties
base_model: base
""",
    "tokenizer_and_template": """models:
  - model: m0
    parameters:
      weight: 0.5
merge_method: task_arithmetic
base_model: base
tokenizer_source: m0
chat_template: chatml
out_dtype: bfloat16
""",
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "  Hello  "}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": " a1 "},
        {"role": "user", "content": "q2"},
    ],
    [
        {"role": "user", "content": "q"},
        {"role": "user_context", "content": "ctx"},
        {"role": "assistant", "content": "a"},
    ],
    [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}],
]


def llama_tensors(layers, hidden=HIDDEN, inter=INTER, vocab=VOCAB):
    """A Llama checkpoint's tensor names and shapes (sparse_parity.py uses other sizes)."""
    t = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        t += [(f"{p}.self_attn.{n}.weight", (hidden, hidden)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        t += [
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    return t + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def config(dtype):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def write_tokenizer(folder):
    """A word-level tokenizer of exactly VOCAB tokens, saved the way transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def make_models(root):
    layout = {}
    for name, (dtype, seed) in MODELS.items():
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for tname, shape in llama_tensors(LAYERS):
            x = torch.rand(shape, generator=g) * 2 - 1
            tensors[tname] = (x * 0.1 + (1.0 if "norm" in tname else 0.0)).to(getattr(torch, dtype))
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        cfg = config(dtype)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        write_tokenizer(folder)
        tok_files = {
            fn: open(os.path.join(folder, fn)).read()
            for fn in sorted(os.listdir(folder))
            if fn not in ("config.json", "model.safetensors")
        }
        layout[name] = {
            "config": cfg,
            "tensors": [[n, list(s), dtype] for n, s in llama_tensors(LAYERS)],
            "tokenizer_files": tok_files,
        }
    return layout


def label(model_ref, root):
    return os.path.relpath(model_ref.model.path, root)


def plain(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return str(v)


def run_mergekit(root, name, text, out):
    """mergekit's own merge of one recipe; returns its planner's per-tensor decisions."""
    recorded = []
    original = mergekit.plan.MergePlanner.plan_to_disk

    def spy(self, out_path):
        tasks = original(self, out_path)
        for weight, task in self._tensors:
            gather = task.gather_tensors
            gather = getattr(gather, "gather_tensors", gather)
            inputs = {label(m, root): wi.name for m, wi in gather.weight_info.items()}
            recorded.append(
                {
                    "name": weight.name,
                    "inputs": inputs,
                    "shared": {k: plain(v) for k, v in task.parameters.items()},
                    "per_model": {
                        label(m, root): {k: plain(v) for k, v in ps.items()}
                        for m, ps in task.input_parameters.items()
                    },
                }
            )
        return tasks

    cwd = os.getcwd()
    os.chdir(root)
    mergekit.plan.MergePlanner.plan_to_disk = spy
    try:
        cfg = MergeConfiguration.model_validate(__import__("yaml").safe_load(text))
        opts = MergeOptions(device="cpu", copy_tokenizer=True, write_model_card=False, quiet=True)
        mergekit.merge.run_merge(cfg, out, options=opts)
    finally:
        mergekit.plan.MergePlanner.plan_to_disk = original
        os.chdir(cwd)
    return recorded


def output_summary(out):
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    tensors = {}
    for fn in sorted(os.listdir(out)):
        if fn.endswith(".safetensors"):
            for k, v in load_file(os.path.join(out, fn)).items():
                tensors[k] = str(v.dtype).replace("torch.", "")
    template = None
    tc = os.path.join(out, "tokenizer_config.json")
    if os.path.exists(os.path.join(out, "chat_template.jinja")):
        template = open(os.path.join(out, "chat_template.jinja")).read()
    elif os.path.exists(tc):
        template = json.load(open(tc)).get("chat_template")
    files = sorted(f for f in os.listdir(out) if not f.endswith(".safetensors"))
    return {
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "vocab_size": cfg.get("vocab_size"),
        "dtype": cfg.get("dtype", cfg.get("torch_dtype")),
        "tensor_dtypes": tensors,
        "chat_template": template,
        "files": files,
    }


def check_templates():
    """stamerge's named templates against mergekit's, rendered by transformers."""
    import importlib.resources

    from mergekit._data import chat_templates
    from transformers.utils.chat_template_utils import render_jinja_template

    checked = {}
    ours_dir = os.path.join(REPO, "src", "recipe", "chat_templates")
    for fn in sorted(os.listdir(ours_dir)):
        name = fn[: -len(".jinja")]
        ours = open(os.path.join(ours_dir, fn)).read()
        theirs = importlib.resources.files(chat_templates).joinpath(fn).read_text()
        renders = 0
        for conv in CONVERSATIONS:
            for gen in (False, True):
                def render(t):
                    try:
                        out, _ = render_jinja_template(
                            conversations=[conv], chat_template=t, add_generation_prompt=gen,
                            bos_token="<s>", eos_token="</s>",
                        )
                        return out[0]
                    except Exception as e:  # raise_exception in the template
                        return ("error", type(e).__name__)
                a, b = render(ours), render(theirs)
                if a != b:
                    raise SystemExit(f"chat template {name}: stamerge's renders {a!r}, mergekit's {b!r} for {conv} (generation prompt {gen})")
                renders += 1
        checked[name] = {"checked_text": ours, "renders_compared": renders}
    return checked


def compare_with_stamerge(root, stamerge, name, text, mk_out):
    """stamerge on the same recipe, against mergekit's output (printed, not recorded)."""
    rp = os.path.join(root, f"{name}.yml")
    with open(rp, "w") as f:
        f.write(text)
    out = os.path.join(root, f"{name}.stamerge")
    r = subprocess.run([stamerge, "-q", "merge", rp, out, "--device", "cpu", "--overwrite"], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  {name}: stamerge refused: {r.stderr.strip()}")
        return
    a = {}
    b = {}
    for d, into in ((mk_out, a), (out, b)):
        for fn in os.listdir(d):
            if fn.endswith(".safetensors"):
                into.update(load_file(os.path.join(d, fn)))
    worst = 0.0
    rel = 0.0
    same = 0
    elements = differ = 0
    for k in a:
        if k not in b:
            print(f"  {name}: stamerge lacks {k}")
            continue
        x, y = a[k].float(), b[k].float()
        if torch.equal(a[k], b[k]):
            same += 1
        worst = max(worst, (x - y).abs().max().item())
        # The difference against the tensor's largest magnitude, in float32 ulps of it.
        rel = max(rel, ((x - y).abs().max() / x.abs().max().clamp(min=1e-30)).item() / 2**-23)
        elements += x.numel()
        differ += (a[k] != b[k]).sum().item()
    extra = sorted(set(b) - set(a))
    print(f"  {name}: {len(a)} tensors, {same} bit-identical, {differ} of {elements} elements differ, largest difference {worst:.3g} ({rel:.2f} float32 ulps of the tensor's largest value), extra {extra}")
    with open(os.path.join(out, "config.json")) as f:
        ours = json.load(f)
    if "num_hidden_layers" in ours:
        print(f"    num_hidden_layers stamerge {ours.get('num_hidden_layers')}, tensors' layers {1 + max(int(k.split('.')[2]) for k in b if k.startswith('model.layers.'))}")
    if "franken" in name:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(out)
        ids = torch.tensor([[0, 5, 7, 9]])
        logits = m(ids).logits
        print(f"    transformers loads it: {type(m).__name__}, {m.config.num_hidden_layers} layers, logits {tuple(logits.shape)}")


def main():
    dest = sys.argv[1]
    stamerge = os.environ.get("STAMERGE")
    with tempfile.TemporaryDirectory() as root:
        layout = make_models(root)
        fixture = {
            "mergekit_version": mergekit.__version__ if hasattr(mergekit, "__version__") else "0.1.5",
            "torch_version": torch.__version__,
            "models": layout,
            "recipes": [],
            "chat_templates": check_templates(),
        }
        for name, text in RECIPES.items():
            out = os.path.join(root, f"{name}.mergekit")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                tensors = run_mergekit(root, name, text, out)
            fixture["recipes"].append({"name": name, "text": text, "tensors": tensors, "output": output_summary(out)})
            print(f"{name}: {len(tensors)} tensors planned by mergekit")
            if stamerge:
                compare_with_stamerge(root, stamerge, name, text, out)
                if "\ndtype: float16\n" in text and "passthrough" not in text:
                    # mergekit computing in float32 as stamerge does, writing float16.
                    fp32 = text.replace("\ndtype: float16\n", "\ndtype: float32\nout_dtype: float16\n")
                    out32 = out + "-fp32"
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        run_mergekit(root, name, fp32, out32)
                    print("  (mergekit with dtype: float32, out_dtype: float16)")
                    compare_with_stamerge(root, stamerge, name, text, out32)
    with open(dest, "w") as f:
        json.dump(fixture, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
