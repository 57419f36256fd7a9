"""Every command in README.md's fenced bash blocks is run here, with tiny overrides, in a
scratch folder that links the project's code, configs and assets (never a folder a run wrote),
or is named below with the reason it is not; and the house the README describes: a layout table
that names every module, no module importing a script, no import cycle."""
import ast
import os
import re
import shlex

import numpy as np
import pytest

from conftest import BOOK, ROOT, run_in_process

TINY = {
    'prepare.py': ['--source={book}'],
    'train.py': ['--n_layer=1', '--n_head=1', '--n_embd=16', '--block_size=16', '--batch_size=2', '--max_iters=2',
                 '--eval_interval=1', '--eval_iters=1', '--sample_tokens=4', '--snapshot_interval=1', '--compile=False',
                 '--device=cpu', '--peak_flops=1e12',
                 '--whole_val=False'],  # the whole val split of the book: seconds per evaluation, for the 50K head
    'sample.py': ['--max_new_tokens=4', '--device=cpu'],
    'analyze.py': ['--top_n=300', '--eval_tokens=256'],
    'embeddings.py': ['--dim=8', '--epochs=1'],
    'bench.py': ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=2', '--new_tokens=4',
                 '--steps=1', '--warmup=1', '--compile=False', '--cpu_config=tiny_cpu.py',
                 '--reference=False'],  # transformers' row: tests/test_bench.py
}
NOT_RUN = {  # command prefix -> why this test does not run it
    'make demo': 'the whole pipeline, minutes long; run by hand and in the README numbers',
    'make test': 'this very test suite',
    'make data': 'downloads the book from the internet',
    'make gpu-check': 'needs a GPU and minutes; tests/test_gpu_check.py runs gpu_check.py tiny on the CPU',
    'torchrun --standalone --nproc_per_node=8': '8 GPUs; tests/test_train.py runs 2 ranks on the CPU',
    'torchrun --standalone --nproc_per_node=2': 'tests/test_train.py starts 2 gloo ranks with the environment this gives '
                                                'them, and runs torchrun itself for two one-process nodes',
    'torchrun --nnodes=2': 'two machines; tests/test_train.py runs two one-process nodes on one machine',
    'python train.py config/finetune_gulliver.py': 'downloads GPT-2 weights; tests/test_model.py tests that path',
    'python sample.py --init_from=gpt2': 'downloads GPT-2 weights; tests/test_model.py tests that path',
    'python analyze.py --init_from=gpt2': 'downloads GPT-2 weights; tests/test_model.py tests that path',
    'python bench.py --device=cuda': 'needs a GPU',
    'python train.py config/gulliver_cpu.py --max_seconds=None': 'the onset study\'s run, 25 minutes; its settings are '
                                                                 'those of the runs above',
    'python analyze.py --out_dir=out-onset-base': 'needs that run; tests/test_analyze.py runs the onset study on '
                                                  'snapshots planted with a known onset',
    'python train.py config/gulliver.py': 'GPT-2 small on a GPU; the same code runs here with the CPU configs',
    'pip install': 'installs packages',
}


def readme_commands():
    text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, re.DOTALL):
        for line in block.splitlines():
            line = line.split(' # ')[0].strip()
            if line and not line.startswith('#'):
                commands.append(line)
    return commands


def tiny_command(command):
    words = shlex.split(command)
    script = next((w for w in words if w.endswith('.py')), None)
    extra = [a.format(book=BOOK) for a in TINY.get(script, [])]
    if script == 'prepare.py':
        words = [w for w in words if not w.startswith('--source=')]
    return ' '.join(shlex.quote(w) for w in words + extra)


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp('readme')
    for name in os.listdir(ROOT):
        if name.endswith('.py') or name in ('config', 'assets', 'gulliver'):
            os.symlink(os.path.join(ROOT, name), folder / name)
    np.save(folder / 'W_pos.npy', np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32))
    (folder / 'tiny_cpu.py').write_text('n_layer = 1\nn_head = 1\nn_embd = 16\nblock_size = 16\nbatch_size = 2\n')
    return folder


def test_readme_has_commands():
    commands = readme_commands()
    assert len(commands) >= 10
    assert 'make test' in commands and 'make demo' in commands


def test_readme_commands_run(scratch, book_path):
    # each runs in this process, as `python script args` would, without paying for torch's import again
    ran = 0
    for command in readme_commands():
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            continue
        assert command.startswith('python '), f"README command neither run nor explained: {command}"
        command = tiny_command(command)
        result = run_in_process(*shlex.split(command)[1:], cwd=scratch)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        ran += 1
    assert ran >= 8


SCRIPTS = {'prepare', 'train', 'sample', 'analyze', 'embeddings', 'bench', 'gpu_check'}
COPIED = {'model', 'geometry'}  # pasted into notebooks: each imports nothing of the project


def project_imports():
    """{module: the project modules it imports}, for the files at the top level ('train') and in the
    package ('gulliver.data'); a module named as `from gulliver import data` counts as gulliver.data."""
    paths = {name[:-3]: name for name in os.listdir(ROOT) if name.endswith('.py')}
    paths.update({f'gulliver.{name[:-3]}': os.path.join('gulliver', name)
                  for name in os.listdir(os.path.join(ROOT, 'gulliver')) if name.endswith('.py')})
    imports = {}
    for module, path in paths.items():
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f'{node.module}.{alias.name}' for alias in node.names}
        imports[module] = names & set(paths) - {module}
    return imports


def test_the_root_holds_only_scripts_and_the_copied_files():
    assert {name[:-3] for name in os.listdir(ROOT) if name.endswith('.py')} == SCRIPTS | COPIED


def test_no_module_imports_a_script_and_imports_have_no_cycle():
    imports = project_imports()
    assert SCRIPTS <= set(imports)
    for module, imported in imports.items():
        assert not imported & SCRIPTS, f"{module}.py imports a script: {imported & SCRIPTS}"
    done, visiting = set(), []

    def visit(module):  # depth-first: a module met again while its own imports are open is a cycle
        assert module not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(module):] + [module])}"
        if module not in done:
            visiting.append(module)
            for imported in imports[module]:
                visit(imported)
            visiting.pop()
            done.add(module)
    for module in imports:
        visit(module)


def test_the_layout_table_names_every_module():
    table = open(os.path.join(ROOT, 'README.md')).read().split('## Layout', 1)[1]
    missing = [module for module in project_imports()
               if f"| `{module.replace('.', '/')}.py` |" not in table and module != 'gulliver.__init__']
    assert not missing, f"README's layout table lacks {missing}"
