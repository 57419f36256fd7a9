import pytest

from gulliver.configurator import at_least, configure, number


def settings():
    return {'learning_rate': 6e-4, 'batch_size': 12, 'compile': True, 'device': 'auto', 'start': '\n',
            'top_k': None, 'peak_flops': 'auto', 'MAX': 3}


def expect_exit(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        configure(settings(), argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and message in err
    return err


def test_overrides_are_parsed_and_typed():
    s = settings()
    configure(s, ['--learning_rate=1', '--batch_size=4', '--compile=False', '--device=cpu', '--top_k=50'])
    assert s['learning_rate'] == 1.0 and isinstance(s['learning_rate'], float)
    assert s['batch_size'] == 4 and s['compile'] is False and s['device'] == 'cpu' and s['top_k'] == 50


def test_string_setting_keeps_text_and_auto_takes_a_value():
    s = settings()
    configure(s, ['--start=123', '--peak_flops=1e12', '--device=cpu'])
    assert s['start'] == '123' and s['peak_flops'] == 1e12 and s['device'] == 'cpu'


def test_config_file_then_override(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text('import math\nbatch_size = 64\nlearning_rate = math.sqrt(4) * 1e-4\n')
    s = settings()
    configure(s, [str(cfg), '--batch_size=8'])
    assert s['batch_size'] == 8 and s['learning_rate'] == pytest.approx(2e-4)


def test_unknown_key_suggests_closest(capsys):
    expect_exit(capsys, ['--lerning_rate=1e-3'], "unknown setting 'lerning_rate'; did you mean 'learning_rate'?")


def test_constants_are_not_settings(capsys):
    expect_exit(capsys, ['--MAX=4'], "unknown setting 'MAX'")


def test_wrong_type(capsys):
    expect_exit(capsys, ['--batch_size=0.5'], "'batch_size' expects int")
    expect_exit(capsys, ['--compile=maybe'], "'compile' expects bool")


def test_missing_value(capsys):
    expect_exit(capsys, ['--batch_size'], 'has no value')


def test_missing_config_file(capsys):
    expect_exit(capsys, ['config/nope.py'], "cannot read config file 'config/nope.py'")


def test_config_file_syntax_error(tmp_path, capsys):
    cfg = tmp_path / 'bad.py'
    cfg.write_text('batch_size = (\n')
    expect_exit(capsys, [str(cfg)], 'is not valid Python')


def test_config_file_unknown_key(tmp_path, capsys):
    cfg = tmp_path / 'typo.py'
    cfg.write_text('batch_sise = 3\n')
    expect_exit(capsys, [str(cfg)], "did you mean 'batch_size'?")


def test_a_list_setting_takes_the_words_after_it(capsys):
    s = {'compare': [], 'top_n': 3000}
    assert configure(s, ['--compare', 'a', 'b/', '--top_n=5']) == {'compare', 'top_n'}
    assert s == {'compare': ['a', 'b/'], 'top_n': 5}
    configure(s, ["--compare=['c']"])
    assert s['compare'] == ['c']
    with pytest.raises(SystemExit):
        configure(s, ['--compare', '--top_n=5'])
    assert '--compare needs values after it' in capsys.readouterr().err


def test_types_are_the_scripts_and_a_file_is_a_module(tmp_path, capsys):
    # the file sets a float setting to an int and computes one from its own names, as a module may
    cfg = tmp_path / 'c.py'
    cfg.write_text('batch_size = 16\nlearning_rate = 1\ntop_k = max(batch_size * k for k in range(3))\n')
    s = settings()
    configure(s, [str(cfg), '--learning_rate=2.5e-4'])  # a float, where the file had left an int
    assert s['learning_rate'] == 2.5e-4 and s['top_k'] == 32
    expect_exit(capsys, ['--compile=None'], "setting 'compile' expects True or False, got None")


def test_rules_take_finite_numbers_only():
    assert number(1e308) and not number(float('inf')) and not number(float('nan')) and not number(True)
    assert at_least(0)(float('inf')) == '>= 0'
