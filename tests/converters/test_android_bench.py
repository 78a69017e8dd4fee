"""benchmark_model output parsing (classic TFLite and LiteRT wording) and the adb flow."""
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from converters import android_bench

OUTPUTS = Path(__file__).parent / 'benchmark_outputs'


def _parse(name: str, model: str = 'm') -> android_bench.BenchResult:
  return android_bench.parse_benchmark_output(model, (OUTPUTS / f'{name}.txt').read_text())


def test_classic_full_delegation():
  r = _parse('classic_gpu_full')
  assert (r.init_ms, r.first_ms, r.warmup_ms, r.avg_ms) == (4187.23, 298.412, 223.992, 187.301)
  assert r.runs == 20 and r.std_ms == pytest.approx(1.402)
  assert (r.delegated_nodes, r.total_nodes, r.partitions) == (1236, 1236, 1)
  assert r.delegate == 'TfLiteGpuDelegateV2'
  assert (r.mem_init_mb, r.mem_overall_mb, r.peak_mem_mb) == (902.121, 917.48, 931.582)
  assert not r.cpu_fallback and r.status == 'ok'


def test_classic_cpu_fallback_is_flagged_with_ops():
  r = _parse('classic_gpu_fallback')
  assert r.avg_ms == pytest.approx(132.46)
  assert (r.delegated_nodes, r.total_nodes, r.partitions) == (141, 158, 5)  # GPU line, not XNNPACK
  assert r.cpu_ops == 17
  assert [op.split(':')[0] for op in r.unsupported_ops] == ['BROADCAST_TO', 'GATHER_ND', 'RESHAPE']
  assert r.cpu_fallback and r.status == 'CPU-FALLBACK'


def test_litert_wording():
  r = _parse('litert_gpu_full')
  assert r.avg_ms == pytest.approx(281.119) and r.init_ms == pytest.approx(6215.9)
  assert r.delegate == 'LiteRtGpuDelegate' and r.partitions == 1
  assert r.peak_mem_mb == pytest.approx(1658.9)
  assert r.status == 'ok'
  failed = _parse('litert_gpu_failed')
  assert failed.avg_ms is None and failed.status == 'FAILED'
  assert any('Failed to compile model' in e for e in failed.errors)
  assert any('Failed to apply GPU delegate' in e for e in failed.errors)


def test_end_to_end_estimate():
  results = {n: android_bench.BenchResult(n, avg_ms=v) for n, v in
             [('text_encoder_0', 100.0), ('text_encoder_1', 50.0), ('unet', 200.0),
              ('vae_decoder', 80.0), ('vae_encoder', 30.0)]}
  e2e = android_bench.end_to_end_ms(results, 4, ['text_encoder_0', 'text_encoder_1'])
  assert e2e == {'generate': 150 + 4 * 200 + 80, 'edit': 150 + 4 * 200 + 80 + 30}
  del results['unet']
  assert android_bench.end_to_end_ms(results, 4, ['text_encoder_0'])['generate'] is None


FAKE_ADB = '''#!{python}
"""Fake adb: logs argv, 'pushes' by copying, answers benchmark_model with recorded outputs."""
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ['FAKE_ADB_LOG'], 'a') as f:
  f.write(json.dumps(args) + '\\n')
if args[:1] == ['-s']:
  args = args[2:]
root = os.environ['FAKE_ADB_ROOT']
if args == ['get-state']:
  print('device')
elif args[0] == 'push':
  shutil.copy(args[1], os.path.join(root, os.path.basename(args[2])))
  print('1 file pushed')
elif args[0] == 'shell' and args[1].endswith('benchmark_model'):
  graph = [a for a in args if a.startswith('--graph=')][0].split('=', 1)[1]
  name = os.path.basename(graph)
  if not os.path.exists(os.path.join(root, name)):
    print('Failed to load model ' + graph); sys.exit(1)
  out = open(os.path.join(os.environ['FAKE_BENCH_OUTPUTS'], name[:-7] + '.txt')).read()
  print(out)
  sys.exit(1 if 'Benchmarking failed' in out else 0)
elif args[0] == 'shell':
  pass
else:
  print('unknown command', args, file=sys.stderr); sys.exit(1)
'''


@pytest.fixture
def fake_device(tmp_path, monkeypatch):
  bin_dir, root, outputs, models = (tmp_path / d for d in ('bin', 'device', 'outputs', 'models'))
  for d in (bin_dir, root, outputs, models):
    d.mkdir()
  adb = bin_dir / 'adb'
  adb.write_text(FAKE_ADB.format(python=sys.executable))
  adb.chmod(adb.stat().st_mode | stat.S_IXUSR)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_ADB_LOG', str(tmp_path / 'adb.log'))
  monkeypatch.setenv('FAKE_ADB_ROOT', str(root))
  monkeypatch.setenv('FAKE_BENCH_OUTPUTS', str(outputs))
  recorded = {'text_encoder': 'litert_gpu_full', 'unet': 'classic_gpu_full',
              'vae_decoder': 'classic_gpu_fallback', 'vae_encoder': 'litert_gpu_failed'}
  entries = {}
  for name, fixture in recorded.items():
    (outputs / f'{name}.txt').write_text((OUTPUTS / f'{fixture}.txt').read_text())
    (models / f'{name}.tflite').write_bytes(b'TFL3 stand-in')
    entries[name] = {'file': f'{name}.tflite'}
  manifest = {'models': entries, 'scheduler': {'num_steps': 4},
              'text': {'encoder_models': ['text_encoder']}}
  (models / 'manifest.json').write_text(json.dumps(manifest))
  binary = tmp_path / 'benchmark_model'
  binary.write_bytes(b'\x7fELF stand-in')
  return models, binary, tmp_path / 'adb.log'


def test_cli_drives_adb_end_to_end(fake_device, capsys):
  models, binary, log = fake_device
  code = android_bench.main(['--models', str(models), '--benchmark-binary', str(binary),
                             '--serial', 'R5CT1234', '--use-gpu', '--runs', '20'])
  out = capsys.readouterr()
  assert code == 1  # vae_decoder falls back to the CPU and vae_encoder fails
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert all(c[:2] == ['-s', 'R5CT1234'] for c in calls)
  pushed = [c[3] for c in calls if c[2] == 'push']
  assert 'benchmark_model' in pushed[0] and len(pushed) == 5
  runs = [c for c in calls if c[2] == 'shell' and c[3].endswith('benchmark_model')]
  assert len(runs) == 4
  assert all('--use_gpu=true' in c and '--num_runs=20' in c for c in runs)
  assert 'CPU-FALLBACK' in out.out and 'BROADCAST_TO' in out.out and 'FAILED' in out.out
  generate = 281.119 + 4 * 187.301 + 132.46
  assert f'(generate): {generate:.1f} ms' in out.out
  assert '(edit): - ms' in out.out  # the encoder failed, so there is no edit estimate
  assert 'vae_decoder' in out.err and 'vae_encoder' in out.err


def test_missing_adb_and_binary_are_clear_errors(fake_device, tmp_path, capsys):
  models, binary, _ = fake_device
  assert android_bench.main(['--models', str(models), '--benchmark-binary',
                             str(tmp_path / 'nope')]) == 2
  assert 'benchmark-binary not found' in capsys.readouterr().err
  assert android_bench.main(['--models', str(models), '--benchmark-binary', str(binary),
                             '--adb', str(tmp_path / 'no-adb')]) == 2
  assert 'adb executable not found' in capsys.readouterr().err
