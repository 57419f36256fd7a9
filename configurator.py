"""
Settings for every script, nanoGPT-style: a script defines its settings as module-level
globals, then calls configure(globals()). Positional arguments are config files (plain
Python, executed into those globals); `--key=value` arguments override them. Values are
parsed with ast.literal_eval (a bare word stays a string) and must match the type of the
default. Any mistake is one line on stderr and exit code 2.

    $ python train.py config/gulliver_cpu.py --batch_size=32 --compile=False
"""
import ast
import difflib
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
    """Return value converted to the type of default, or fail."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    fail(f"setting {key!r} expects {type(default).__name__}, got {value!r} "
         f"({type(value).__name__})")


def configure(settings, argv=None):
    """Apply config files and --key=value overrides from argv to the settings dict."""
    argv = sys.argv[1:] if argv is None else argv
    # settings are the lower-case globals of simple types; UPPER_CASE names are constants
    keys = [k for k, v in settings.items() if k.islower() and not k.startswith('_') and isinstance(v, SETTING_TYPES)]
    for arg in argv:
        if not arg.startswith('--'):
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                fail(f"cannot read config file {arg!r} ({e.strerror}); pass an existing file such as config/gulliver_cpu.py")
            file_settings = {}
            try:
                exec(compile(source, arg, 'exec'), {}, file_settings)
            except Exception as e:
                line = getattr(e, 'lineno', None)
                fail(f"config file {arg} is not valid Python ({type(e).__name__}: {e}"
                     f"{'' if line is None else f', line {line}'}); fix the file")
            for key, value in file_settings.items():
                if key.islower() and not key.startswith('_') and isinstance(value, SETTING_TYPES):
                    check_key(key, keys)
                    settings[key] = coerce(key, value, settings[key])
        else:
            if '=' not in arg:
                fail(f"{arg!r} has no value; write it as {arg}=VALUE")
            key, text = arg[2:].split('=', 1)
            check_key(key, keys)
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word such as --device=cpu
            if isinstance(settings[key], str) and not isinstance(value, str):
                value = text  # a string setting keeps what was typed, e.g. --start=123
            settings[key] = coerce(key, value, settings[key])


def resolve_device(device):
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; fail on a device that is not there."""
    import torch
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device {device!r} asked for, but CUDA is not available here; use --device=cpu or --device=auto")
    if device != 'cpu' and not device.startswith(('cuda', 'mps')):
        fail(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype, device):
    """'auto' -> bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on CPU."""
    import torch
    if dtype == 'auto':
        if not device.startswith('cuda'):
            return 'float32'
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        fail(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return dtype
