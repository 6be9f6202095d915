"""The verdict rules of experiments.claims, on synthetic run records and on the committed ones."""

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the root there
  sys.path.insert(0, ROOT)

from experiments import claims, grid  # noqa: E402


def rec(label, acc, seed=0, uniq=100, paper_bits=8000, csr_bits=None, file_bytes=1000):
  return {
    'label': label,
    'best_accuracy': acc / 100,
    'seed': seed,
    'unique_values': uniq,
    'storage': {'paper_bits': paper_bits},
    'csr_bits': csr_bits,
    'artifact': {'file_bytes': file_bytes},
  }


def claim_verdict(shallow, deep):
  return claims.claim3(shallow, deep)[0]


def test_claim3_needs_the_gap_to_narrow_by_a_point():
  shallow = [rec('Dense', 70), rec('Mask', 60)]
  assert claim_verdict(shallow, [rec('Dense', 72), rec('Mask', 66)]) == 'supported'
  assert claim_verdict(shallow, [rec('Dense', 72), rec('Mask', 61.5)]).startswith('not supported')
  assert claim_verdict(shallow, [rec('Dense', 72), rec('Mask', 58)]).startswith('contradicted')


def test_claim3_averages_seeds():
  shallow = [rec('Dense', 70), rec('Mask', 60)]
  deep = [rec('Dense', 72, 0), rec('Dense', 70, 1), rec('Mask', 64, 0), rec('Mask', 66, 1)]
  verdict, lines = claims.claim3(shallow, deep)
  assert verdict == 'supported'
  assert 'gap 6.00 points' in lines[1] and '(2 seeds)' in lines[1]
  assert lines[2] == 'the gap narrows by 4.00 points from depth 4 to depth 8'


def test_claim4_compares_relative_drops():
  convmixer = [rec('Dense', 70), rec('Mask', 60), rec('RP 1e-2', 59), rec('RP 1e-4', 50)]
  # ConvMixer loses 10 / 50 = 20 % of Mask's above-chance accuracy at RP 1e-4.
  unstable = [rec('Dense', 60), rec('Mask', 50), rec('RP 1e-2', 49), rec('RP 1e-4', 30)]  # 50 %
  stable = [rec('Dense', 60), rec('Mask', 50), rec('RP 1e-2', 49), rec('RP 1e-4', 43)]  # 17.5 %
  assert claims.claim4(unstable, convmixer)[0] == 'supported'
  assert claims.claim4(stable, convmixer)[0].startswith('not supported')
  assert claims.claim4(unstable[:2], convmixer)[0] == 'not measured yet'
  assert claims.relative_drop(convmixer, 'RP 1e-4') == pytest.approx(0.2)


def test_claim5_compares_only_at_equal_or_smaller_storage():
  records = [
    rec('Dense', 80, paper_bits=64000, file_bytes=9000),
    rec('RP 1e-2', 60, paper_bits=2000, file_bytes=1000),
    # Needs more storage than RP 1e-2 both ways, and is worse: one win per convention.
    rec('Random 90%', 50, paper_bits=0, csr_bits=6400, file_bytes=1500),
    # Smaller than RP 1e-2 both ways: never compared, even though it is better.
    rec('Magnitude 96%', 70, paper_bits=0, csr_bits=1000, file_bytes=800),
  ]
  verdict, lines = claims.claim5(records)
  assert verdict.startswith('supported')
  assert lines[0].startswith('2 of 2 comparisons')
  records[2] = rec('Random 90%', 65, paper_bits=0, csr_bits=6400, file_bytes=1500)
  verdict, lines = claims.claim5(records)
  assert verdict.startswith('contradicted')
  assert 'RP 1e-2 vs Random 90% (paper, -5.00 points)' in lines[0]


def test_claim5_mixed_outcome_is_partial():
  records = [
    rec('MP', 62, paper_bits=8000, file_bytes=1000),
    rec('RP 1e-2', 58, paper_bits=2000, file_bytes=1000),
    rec('Random 90%', 60, paper_bits=0, csr_bits=9000, file_bytes=1500),
  ]
  verdict, _ = claims.claim5(records)
  assert verdict == 'only partly: PEMN wins 2 of 4 comparisons'


def test_claim5_without_baselines_is_not_measured():
  assert claims.claim5([rec('MP', 60)])[0] == 'not measured yet'


def _resnet_depth(dense32, mp32, rp32, dense56, mp56, rp56):
  r32 = [rec('Dense', dense32), rec('MP', mp32), rec('RP 1e-2', rp32)]
  r56 = [rec('Dense', dense56), rec('MP', mp56), rec('RP 1e-2', rp56)]
  return claims.claim5_depth(r32, r56)


def test_claim5_depth_needs_both_pemn_points_to_lose_a_point_less():
  assert _resnet_depth(70, 60, 58, 72, 65, 63)[0] == 'supported'
  # MP loses 10 -> 7 points, RP 1e-2 only 12 -> 11.5: not both by a point
  assert _resnet_depth(70, 60, 58, 72, 65, 60.5)[0].startswith('not supported')
  assert _resnet_depth(70, 65, 63, 72, 60, 58)[0].startswith('contradicted')
  verdict, lines = _resnet_depth(70, 60, 58, 72, 65, 63)
  assert lines[0] == (
    'MP: loses 10.00 points to Dense at depth 32, 7.00 at depth 56 (less by 3.00)'
  )


def test_claim5_depth_without_a_point_is_not_measured():
  r32 = [rec('Dense', 70), rec('MP', 60)]
  r56 = [rec('Dense', 70), rec('MP', 60), rec('RP 1e-2', 60)]
  assert claims.claim5_depth(r32, r56)[0] == 'not measured yet'
  # one depth only: not measured, but what was measured is reported
  verdict, lines = claims.claim5_depth([rec('Dense', 66), rec('MP', 61.5)], [])
  assert verdict == 'not measured yet'
  assert lines == ['MP: loses 4.50 points at 32 layers to Dense; the other depth not run']


def test_the_committed_records_give_the_committed_verdicts(tmp_path):
  results = tmp_path / 'results'
  shutil.copytree(grid.RESULTS, results, ignore=shutil.ignore_patterns('*.png'))
  assert claims.main(['--results', str(results)]) == 0

  def verdicts(path):
    with open(path) as f:
      return [ln for ln in f.read().splitlines() if ln.startswith('- Verdict:')]

  got = verdicts(results / 'README.md')
  assert len(got) == 8 and got == verdicts(os.path.join(grid.RESULTS, 'README.md'))
