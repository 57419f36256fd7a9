"""
GPT-2 in the Hugging Face format, read and written: a folder with config.json and
model.safetensors, as transformers' GPT2LMHeadModel saves it, or a model of the hub
('gpt2' ... 'gpt2-xl'), downloaded once into a cache folder. model.py's GPT.from_pretrained
and GPT.save_pretrained use these: read_pretrained returns the file's tensors as stored,
copy_pretrained maps them onto model.py's names and layout, write_pretrained maps them back.

The two layouts differ in three ways: the hub's older files name the tensors without the
'transformer.' prefix; the four matrices of a block are stored as Conv1D, a Linear whose
weight is transposed, (in, out); and the head is not stored, being tied to the token
embedding (whose padding rows, model.py's pad_vocab_to, are not stored either).
"""
import json
import os

from gulliver.atomic import write_atomic
from gulliver.download import download

HF_HUB_URL = 'https://huggingface.co'
HF_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'gulliver-gpt')
PRETRAINED = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024),
              'gpt2-large': (36, 20, 1280), 'gpt2-xl': (48, 25, 1600)}  # n_layer, n_head, n_embd
CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def read_config_json(path):
    with open(path, encoding='utf-8') as f:
        hf = json.load(f)
    missing = [key for key in ('n_positions', 'vocab_size', 'n_layer', 'n_head', 'n_embd') if key not in hf]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    return hf


def read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(str(e))


READERS = {'config.json': read_config_json, 'model.safetensors': read_safetensors}


def read_hf_file(path, cached):
    """One file of a Hugging Face GPT-2 directory, read by READERS; ValueError (one line) naming
    the file when it is missing or damaged, and for a cached download, what to do about it."""
    if not os.path.exists(path):
        raise ValueError(f"no {path}: pass a directory written by save_pretrained "
                         f"(config.json, model.safetensors)")
    try:
        return READERS[os.path.basename(path)](path)
    except (OSError, ValueError) as e:
        advice = "delete it, and it is downloaded again" if cached else "save the model again"
        raise ValueError(f"{path} is damaged ({e}); {advice}") from None


def read_pretrained(name_or_dir, hub_url=None, cache_dir=None):
    """(GPTConfig's shape fields, {file's tensor name: tensor}, the safetensors path) of a local
    save_pretrained directory or of a hub model, downloaded from hub_url (None: HF_HUB_URL) into
    cache_dir (None: HF_CACHE_DIR) the first time."""
    hub_url, cache_dir = hub_url or HF_HUB_URL, cache_dir or HF_CACHE_DIR
    if os.path.isdir(name_or_dir):
        folder, cached = name_or_dir, False
    elif name_or_dir in PRETRAINED:
        folder, cached = os.path.join(cache_dir, name_or_dir), True
        for file in ('config.json', 'model.safetensors'):
            if not os.path.exists(os.path.join(folder, file)):
                print(f"downloading {name_or_dir}/{file} from {hub_url} ...")
                download(f"{hub_url}/{name_or_dir}/resolve/main/{file}", os.path.join(folder, file),
                         check=READERS[file])
    else:
        raise ValueError(f"unknown model {name_or_dir!r}: use one of {', '.join(PRETRAINED)} or a directory "
                         f"with config.json and model.safetensors")
    hf, tensors = (read_hf_file(os.path.join(folder, file), cached)
                   for file in ('config.json', 'model.safetensors'))
    shape = dict(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                 n_head=hf['n_head'], n_embd=hf['n_embd'])
    return shape, tensors, os.path.join(folder, 'model.safetensors')


def copy_pretrained(tensors, state, source):
    """Copy a file's tensors (read_pretrained) into a model's state dict, in place: the names
    prefixed, Conv1D weights transposed, the token embedding into its first rows. ValueError for a
    tensor the model has no place for, of the wrong shape, or a model tensor the file lacks."""
    ours = {name: tensor for name, tensor in state.items() if name != 'lm_head.weight'}
    loaded = set()
    for name, tensor in tensors.items():
        key = name if name.startswith('transformer.') else 'transformer.' + name
        if key.endswith(('.attn.bias', '.attn.masked_bias')) or name == 'lm_head.weight':
            continue  # causal-mask buffers of older files; the head is tied to wte
        if key not in ours:
            raise ValueError(f"unexpected tensor {name!r} in {source}")
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        target = ours[key][:tensor.size(0)] if key == 'transformer.wte.weight' else ours[key]
        if target.shape != tensor.shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(tensor)
        loaded.add(key)
    missing = sorted(set(ours) - loaded)
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensors, e.g. {missing[0]!r}")


def write_pretrained(folder, state, config):
    """Write config.json and model.safetensors for a model's state dict and its GPTConfig, as
    transformers' GPT2LMHeadModel expects them; both files together, atomically."""
    from safetensors.torch import save_file
    c = config
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, tensor in state.items():
        if name == 'lm_head.weight':
            continue
        if name == 'transformer.wte.weight':
            tensor = tensor[:c.vocab_size]
        tensors[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
    hf_config = {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': c.vocab_size,
                 'n_positions': c.block_size, 'n_ctx': c.block_size, 'n_embd': c.n_embd, 'n_layer': c.n_layer,
                 'n_head': c.n_head, 'n_inner': None, 'activation_function': 'gelu_new',
                 'resid_pdrop': c.dropout, 'embd_pdrop': c.dropout, 'attn_pdrop': c.dropout,
                 'layer_norm_epsilon': 1e-5, 'initializer_range': 0.02, 'bos_token_id': 50256,
                 'eos_token_id': 50256, 'tie_word_embeddings': True}
    write_atomic({os.path.join(folder, 'model.safetensors'):
                      lambda tmp: save_file(tensors, tmp, metadata={'format': 'pt'}),
                  os.path.join(folder, 'config.json'): json.dumps(hf_config, indent=2).encode()})
