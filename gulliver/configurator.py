"""
Settings for every script, nanoGPT-style: a script defines its settings as module-level
globals, then calls configure(globals()). Positional arguments are config files (plain
Python, executed as a module and its settings copied into those globals); `--key=value`
arguments override them. Values are parsed with ast.literal_eval (a bare word stays a string)
and must match the type of the script's default (a setting that defaults to None or 'auto'
takes any value, held to its rule by check(); None, "not set", sets any but a True/False one).
A list setting also takes the words after it, up to the next --setting: `--compare a b` is
`--compare="['a', 'b']"`. Then check() holds each setting to its rule: a set of values
(one_of) or a range. Any mistake is one line on stderr and exit code 2. train.py's rules,
the longest, are here too (train_rules), beside those of a model it resumes (check_model).

    $ python train.py config/gulliver_cpu.py --batch_size=32 --compile=False
"""
import ast
import difflib
import math
import re
import sys

SETTING_TYPES = (bool, int, float, str, tuple, list, type(None))


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_key(key, settings):
    if key not in settings:
        close = difflib.get_close_matches(key, settings, n=3, cutoff=0.6)
        if close:
            fail(f"unknown setting {key!r}; did you mean {' or '.join(repr(k) for k in close)}?")
        fail(f"unknown setting {key!r}; the settings are {', '.join(sorted(settings))}")


def coerce(key, value, default):
    """Return value converted to the type of default (the script's, not a config file's), or fail."""
    if value is None and isinstance(default, bool):
        fail(f"setting {key!r} expects True or False, got None")
    if default is None or value is None or type(value) is type(default) or default == 'auto':
        return value  # None: not set, any value may set it; 'auto': check() holds the value to its rule
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    fail(f"setting {key!r} expects {type(default).__name__}, got {value!r} "
         f"({type(value).__name__})")


def configure(settings, argv=None):
    """Apply config files and --key=value overrides from argv to the settings dict; return the
    names they set (whatever their values), so that a script can tell a choice from a default."""
    argv = sys.argv[1:] if argv is None else argv
    # settings are the lower-case globals of simple types; UPPER_CASE names are constants
    keys = [k for k, v in settings.items()
            if k.islower() and not k.startswith('_') and isinstance(v, SETTING_TYPES)]
    # a config file's 260 must not make --max_seconds=90.5 a type error
    defaults = {k: settings[k] for k in keys}
    chosen = set()
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if arg.startswith('--') and '=' not in arg and isinstance(settings.get(arg[2:]), list):
            words = []
            while argv and not argv[0].startswith('--'):
                words.append(argv.pop(0))
            if not words:
                fail(f"{arg} needs values after it, e.g. {arg} a b")
            settings[arg[2:]] = words
            chosen.add(arg[2:])
        elif not arg.startswith('--'):
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                fail(f"cannot read config file {arg!r} ({e.strerror}); "
                     f"pass an existing file (the configs are in config/)")
            file_settings = {}  # one namespace, as a module's: a comprehension in the file sees its names
            try:
                exec(compile(source, arg, 'exec'), file_settings)
            except Exception as e:
                line = getattr(e, 'lineno', None)
                fail(f"config file {arg} is not valid Python ({type(e).__name__}: {e}"
                     f"{'' if line is None else f', line {line}'}); fix the file")
            for key, value in file_settings.items():
                if key.isupper() and key.lower() in keys:
                    fail(f"config file {arg} sets {key}; settings are lower-case: write {key.lower()}")
                if key.islower() and not key.startswith('_') and isinstance(value, SETTING_TYPES):
                    check_key(key, keys)
                    settings[key] = coerce(key, value, defaults[key])
                    chosen.add(key)
        else:
            if '=' not in arg:
                fail(f"{arg!r} has no value; write it as {arg}=VALUE")
            key, text = arg[2:].split('=', 1)
            check_key(key, keys)
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word such as --device=cpu
            if isinstance(defaults[key], str) and defaults[key] != 'auto' and not isinstance(value, str):
                value = text  # a string setting keeps what was typed, e.g. --start=123
            settings[key] = coerce(key, value, defaults[key])
            chosen.add(key)
    return chosen


# Rules for check(): each takes a value and returns None when it is allowed, else what it must be.
def number(value):
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(*allowed):
    return lambda value: None if any(value is a or (value == a and type(value) is type(a)) for a in allowed) \
        else f"one of {', '.join(repr(a) for a in allowed)}"


def at_least(low):
    return lambda value: None if number(value) and value >= low else f">= {low}"


def greater_than(low):
    return lambda value: None if number(value) and value > low else f"> {low}"


def integer_at_least(low):
    return lambda value: None if type(value) is int and value >= low else f"an integer >= {low}"


def below(low, high):
    """low <= value < high."""
    return lambda value: None if number(value) and low <= value < high else f"in [{low}, {high})"


def a_seed(value):
    return None if type(value) is int and 0 <= value < 2 ** 63 else "an integer in [0, 2**63)"


def a_path(value):
    return None if isinstance(value, str) and value else 'a path'


def optional(rule):
    """None (not set), or what rule allows."""
    return lambda value: None if value is None or rule(value) is None else f"None or {rule(value)}"


def auto_or(rule):
    """'auto' (the script measures it), or what rule allows."""
    return lambda value: None if value == 'auto' or rule(value) is None else f"'auto' or {rule(value)}"


def check(settings, rules):
    """Fail on the first setting whose rule rejects its value: 'NAME must be WHAT, not VALUE'. A rule
    keyed by a tuple of names spans settings: it takes their values, and the message names the first."""
    for names, rule in rules.items():
        names = names if isinstance(names, tuple) else (names,)
        expected = rule(*(settings[name] for name in names))
        if expected is not None:
            fail(f"{names[0]} must be {expected}, not {settings[names[0]]!r}")


def train_rules(pretrained, pos_embs):
    """train.py's settings and the values each may take, for check(): pretrained, the GPT-2 names
    init_from takes besides 'scratch' and 'resume'; pos_embs, model.py's position schemes."""
    return {
        'init_from': one_of('scratch', 'resume', *pretrained), 'sampler': one_of('random', 'epoch'),
        'objective': one_of('clm', 'mlm'), 'optimizer': one_of('adamw', 'muon'),
        'pos_emb': one_of(*pos_embs), 'compile': one_of(None, True, False),
        'dtype': one_of('auto', 'float32', 'bfloat16', 'float16'), 'backend': one_of('nccl', 'gloo'),
        'dropout': below(0, 1), 'beta1': below(0, 1), 'beta2': below(0, 1),
        'out_dir': lambda d: None if d else 'a folder',
        **{name: at_least(1) for name in ('batch_size', 'block_size', 'gradient_accumulation_steps',
                                          'eval_interval', 'eval_iters', 'log_interval', 'n_layer',
                                          'n_head', 'n_embd', 'pad_vocab_to', 'max_skipped_steps')},
        **{name: at_least(0) for name in ('learning_rate', 'min_lr', 'max_iters', 'weight_decay',
                                          'warmup_iters', 'sample_tokens')},
        'seed': a_seed,
        'cooldown': optional(lambda f: None if number(f) and 0 < f <= 1 else "in (0, 1]"),
        'max_seconds': optional(greater_than(0)), 'grad_clip': optional(greater_than(0)),
        'wpe_init_std': at_least(0), 'wpe_init': one_of('normal', 'sinusoidal'),
        'wpe_weight_decay': optional(at_least(0)), 'embedding_lr': optional(greater_than(0)),
        'snapshot_interval': optional(integer_at_least(1)), 'peak_flops': auto_or(greater_than(0)),
        ('learning_rate', 'embedding_lr'): lambda lr, embedding_lr: None if embedding_lr is None or lr > 0
        else "> 0 with embedding_lr (the embeddings' schedule is a multiple of learning_rate's)",
        ('n_embd', 'n_head'): lambda n_embd, n_head: None if n_embd % n_head == 0
        else f"a multiple of n_head ({n_head})",
        ('pos_emb', 'n_embd', 'n_head'): lambda pos_emb, n_embd, n_head:
        None if pos_emb != 'rope' or n_embd // n_head % 2 == 0 else
        f"another scheme than 'rope' (which rotates pairs) with an odd head size "
        f"n_embd / n_head ({n_embd // n_head})",
        ('init_from', 'pos_emb', 'bias', 'objective'): lambda init_from, *asked: next(
            (f"'scratch' for {name}={value!r} (GPT-2 has {name}={gpt2!r}: drop --{name} to fine-tune it)"
             for name, value, gpt2 in zip(('pos_emb', 'bias', 'objective'), asked, ('learned', True, 'clm'))
             if init_from in pretrained and value != gpt2), None),
        ('eval_only', 'init_from'): lambda eval_only, init_from:
        None if not eval_only or init_from not in pretrained
        else f"False with init_from={init_from!r} (it evaluates the run in out_dir; drop --init_from)",
    }


def check_model(settings, chosen, model_config, source):
    """A resumed or pretrained model has its own shape: a setting chosen to be otherwise fails.
    The objective must always match, chosen or not: it decides what the loss is."""
    built = {**{name: getattr(model_config, name)
                for name in ('n_layer', 'n_head', 'n_embd', 'bias', 'pos_emb')},
             'objective': 'clm' if model_config.causal else 'mlm'}
    for name, value in built.items():
        if settings[name] != value and (name in chosen or name == 'objective'):
            fail(f"{source} has {name}={value!r}, but {name}={settings[name]!r} was asked for; "
                 + (f"resume with --{name}={value}" if name == 'objective'
                    else f"drop --{name}, or train from scratch"))


def resolve_device(device):
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; fail on a device that is not there."""
    import torch
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device != 'cpu' and not re.fullmatch(r'cuda(:\d+)?', str(device)):
        fail(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device {device!r} asked for, but CUDA is not available here; "
             f"use --device=cpu or --device=auto")
    if device.startswith('cuda:') and int(device[5:]) >= torch.cuda.device_count():
        fail(f"no {device} here: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
             f"cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(dtype, device):
    """'auto' -> bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on CPU."""
    import torch
    if dtype == 'auto':
        if not device.startswith('cuda'):
            return 'float32'
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return dtype
