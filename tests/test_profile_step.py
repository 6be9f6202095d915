"""``experiments.profile_step``: the trace is read into kinds of ops (no timing assertion)."""

from __future__ import annotations

import os

import pytest

from experiments import common, profile_step
from pemn_jax import native

DEMO = os.path.join(common.ROOT, 'pemn_jax', 'configs', 'demo.py')


def test_kinds_of_op_names():
  targets = {'ffi_call.3': 'pemn_dw_fwd', 'custom-call.1': '__onednn$matmul'}
  kind = profile_step.kind_of
  assert kind('ffi_call.3', targets) == 'native:dw_fwd'
  assert kind('custom-call.1', targets) == 'call:__onednn$matmul'
  assert kind('ynn_fusion.19', targets) == kind('dot.4', targets) == 'dot'
  assert kind('multiply_add_fusion.2', targets) == kind('wrapped_reduce', targets) == 'fusion'
  assert kind('copy.145', targets) == kind('transpose.2', targets) == 'copy'
  assert kind('end: copy.145', targets) is None
  assert kind('ThunkExecutor::Execute', targets) is None
  assert kind('after-all.1', targets) == 'other'


def test_custom_call_targets_are_read_from_the_hlo():
  hlo = (
    '  ffi_call.61 = f32[3,3]{1,0} custom-call(f32[3,3]{1,0} %p), '
    'custom_call_target="pemn_topk_mask", api_version=API_VERSION_TYPED_FFI\n'
    '  ROOT add.2 = f32[3,3]{1,0} add(ffi_call.61, ffi_call.61)\n'
  )
  assert profile_step.custom_call_targets(hlo) == {'ffi_call.61': 'pemn_topk_mask'}


@pytest.mark.parametrize('dtype', ['float32'])
def test_a_traced_step_is_attributed_to_its_ops(dtype):
  config = common.load_config(DEMO, [f'--config.model.dtype={dtype}'])
  row = profile_step.profile(config, batch_size=8, steps=1)
  ops = row['op_ms_per_step']
  assert 'dot' in ops and 'fusion' in ops
  if native.available():  # the default native kernels ran, and are named
    assert any(k.startswith('native:') for k in ops)
  assert sum(row['op_share'].values()) == pytest.approx(1.0)
  assert row['op_ms_total'] > 0 and row['step_wall_ms'] > 0
  assert '| dot | ' in profile_step.format_table([row])
