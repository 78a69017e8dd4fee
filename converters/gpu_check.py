"""Static checker: can the TFLite GPU delegate run every op of a `.tflite` file?

The converter happily emits ops the GPU delegate rejects (BROADCAST_TO, GATHER_ND,
5-D tensors, int64 index math, dynamic shapes); on the phone those silently fall
back to the CPU and the model gets several times slower. This module reads the
flatbuffer itself (with the LiteRT schema bindings) and reports every such
problem with subgraph, op index, op name and tensor names, so export can fail
before a model ever reaches a phone.

The op rules mirror `tensorflow/lite/tools/versioning/gpu_compatibility.cc`
(`CheckGpuDelegateCompatibility`, the function the delegate itself uses), as an
explicit allow-list: an op that is not listed is a finding. On top of the
per-op rules every tensor an op touches must be static, rank <= 4, and a float
unless an op explicitly takes an int32/bool at that slot.

CLI: `python -m converters.gpu_check model.tflite [...]` exits 1 on any finding.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import numpy as np

try:
  from ai_edge_litert import schema_py_generated as schema
except ImportError:  # Only TensorFlow installed.
  from tensorflow.lite.python import schema_py_generated as schema

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper()}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if k.isupper()}
_T = schema.TensorType
_FLOATS = {_T.FLOAT32, _T.FLOAT16}

# Ops the GPU delegate accepts (subject to the per-op checks in `_op_problems`),
# from gpu_compatibility.cc. Everything else falls back to the CPU.
GPU_BUILTIN_OPS = frozenset({
    'ABS', 'ADD', 'ADD_N', 'AVERAGE_POOL_2D', 'BATCH_MATMUL', 'CAST',
    'CONCATENATION', 'CONV_2D', 'COS', 'CUMSUM', 'DENSIFY', 'DEPTHWISE_CONV_2D',
    'DEPTH_TO_SPACE', 'DEQUANTIZE', 'DIV', 'ELU', 'EQUAL', 'EXP', 'FLOOR',
    'FLOOR_DIV', 'FLOOR_MOD', 'FULLY_CONNECTED', 'GATHER', 'GELU', 'GREATER',
    'GREATER_EQUAL', 'HARD_SWISH', 'LEAKY_RELU', 'LESS', 'LESS_EQUAL', 'LOG',
    'LOGICAL_AND', 'LOGISTIC', 'MAXIMUM', 'MAX_POOL_2D', 'MEAN', 'MINIMUM',
    'MIRROR_PAD', 'MUL', 'NEG', 'NOT_EQUAL', 'ONE_HOT', 'PACK', 'PAD', 'PADV2',
    'POW', 'PRELU', 'QUANTIZE', 'REDUCE_MAX', 'REDUCE_MIN', 'REDUCE_PROD', 'RELU',
    'RELU6', 'RELU_N1_TO_1', 'RESHAPE', 'RESIZE_BILINEAR',
    'RESIZE_NEAREST_NEIGHBOR', 'RSQRT', 'SELECT', 'SELECT_V2', 'SIGN', 'SIN',
    'SLICE', 'SOFTMAX', 'SPACE_TO_DEPTH', 'SPLIT', 'SPLIT_V', 'SQRT', 'SQUARE',
    'SQUARED_DIFFERENCE', 'STRIDED_SLICE', 'SUB', 'SUM', 'TANH', 'TILE',
    'TRANSPOSE', 'TRANSPOSE_CONV',
})
# Custom ops the GPU delegate implements itself.
GPU_CUSTOM_OPS = frozenset(
    {'Convolution2DTransposeBias', 'MaxPoolingWithArgmax2D', 'MaxUnpooling2D', 'Resampler'})
# Why the usual offenders are rejected, for a readable report.
_KNOWN_BAD = {
    'BROADCAST_TO': 'BROADCAST_TO is not implemented by the GPU delegate',
    'GATHER_ND': 'GATHER_ND is not implemented by the GPU delegate',
    'SHAPE': 'SHAPE (dynamic shape computation) is not implemented by the GPU delegate',
    'WHILE': 'control flow (WHILE) runs on the CPU',
    'IF': 'control flow (IF) runs on the CPU',
    'CALL_ONCE': 'CALL_ONCE (variable initialisation subgraph) runs on the CPU',
    'CALL': 'CALL (subgraph call) runs on the CPU',
    'EXPAND_DIMS': 'EXPAND_DIMS is not in the GPU delegate op list (use RESHAPE)',
    'SQUEEZE': 'SQUEEZE is not in the GPU delegate op list (use RESHAPE)',
    'EMBEDDING_LOOKUP': 'EMBEDDING_LOOKUP is not implemented by the GPU delegate',
}
# Non-float runtime tensors are only allowed where an op explicitly takes them.
_NONFLOAT_INPUT_SLOTS = {
    'GATHER': {1: {_T.INT32}},
    'SELECT': {0: {_T.BOOL}},
    'SELECT_V2': {0: {_T.BOOL}},
    'CAST': {0: {_T.BOOL, _T.INT32}},
    'LOGICAL_AND': {0: {_T.BOOL}, 1: {_T.BOOL}},
}
_COMPARISONS = {'EQUAL', 'NOT_EQUAL', 'GREATER', 'GREATER_EQUAL', 'LESS', 'LESS_EQUAL'}
_NONFLOAT_OUTPUTS = {'CAST': {_T.BOOL, _T.INT32}, 'LOGICAL_AND': {_T.BOOL},
                     **{name: {_T.BOOL} for name in _COMPARISONS}}
_SIGN_BIT = schema.ActivationFunctionType.SIGN_BIT


@dataclasses.dataclass(frozen=True)
class Finding:
  """One thing the GPU delegate cannot run.

  `kind` is one of 'op', 'custom', 'rank', 'dtype', 'dynamic', 'subgraph'.
  `op_index` / `op_name` are None for findings about graph inputs or subgraphs.
  """
  kind: str
  subgraph: int
  op_index: int | None
  op_name: str | None
  tensors: tuple[str, ...]
  reason: str

  def __str__(self) -> str:
    where = f'subgraph {self.subgraph}'
    if self.op_index is not None:
      where += f' op #{self.op_index} {self.op_name}'
    tensors = f" tensors [{', '.join(self.tensors)}]" if self.tensors else ''
    return f'[{self.kind}] {where}:{tensors} {self.reason}'


@dataclasses.dataclass(frozen=True)
class _Tensor:
  index: int
  name: str
  dtype: int
  shape: tuple[int, ...]
  signature: tuple[int, ...]
  is_const: bool
  int_data: tuple[int, ...] | None = None  # values of small int32 constants (axes, shapes)

  @property
  def dtype_name(self) -> str:
    return _TYPE_NAMES.get(self.dtype, str(self.dtype))

  def describe(self) -> str:
    return f'{self.name}{list(self.signature or self.shape)}:{self.dtype_name}'


@dataclasses.dataclass(frozen=True)
class _Op:
  index: int
  name: str
  is_custom: bool
  inputs: tuple[_Tensor | None, ...]  # None = omitted optional input
  outputs: tuple[_Tensor, ...]
  options: object  # the schema's `*OptionsT` object, or None


def _load_model(model: bytes | str | Path) -> tuple[bytes, object]:
  if isinstance(model, (str, Path)):
    path = Path(model)
    if not path.is_file():
      raise FileNotFoundError(f'gpu_check: no such .tflite file: {path}')
    data = path.read_bytes()
    label = str(path)
  else:
    data, label = bytes(model), '<bytes>'
  if len(data) < 8 or not schema.Model.ModelBufferHasIdentifier(data, 0):
    raise ValueError(f'gpu_check: {label} is not a TFLite flatbuffer (missing TFL3 identifier)')
  return data, schema.Model.GetRootAs(data, 0)


def _read_tensors(model, subgraph) -> list[_Tensor]:
  tensors = []
  for i in range(subgraph.TensorsLength()):
    t = subgraph.Tensors(i)
    shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    sig = tuple(int(d) for d in t.ShapeSignatureAsNumpy()) if t.ShapeSignatureLength() else ()
    buf = model.Buffers(t.Buffer()) if 0 < t.Buffer() < model.BuffersLength() else None
    is_const = buf is not None and (buf.DataLength() > 0 or buf.Offset() > 1)
    name = (t.Name() or b'').decode('utf-8', 'replace')
    int_data = None
    if is_const and t.Type() == _T.INT32 and 0 < buf.DataLength() <= 64:
      int_data = tuple(int(v) for v in np.frombuffer(buf.DataAsNumpy().tobytes(), '<i4'))
    tensors.append(_Tensor(i, name, t.Type(), shape, sig, is_const, int_data))
  return tensors


def _read_ops(model, subgraph, tensors: list[_Tensor]) -> list[_Op]:
  ops = []
  for i in range(subgraph.OperatorsLength()):
    op = subgraph.Operators(i)
    code = model.OperatorCodes(op.OpcodeIndex())
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    is_custom = builtin == schema.BuiltinOperator.CUSTOM
    name = ((code.CustomCode() or b'').decode() if is_custom
            else _OP_NAMES.get(builtin, f'BUILTIN_{builtin}'))
    ins = tuple(tensors[j] if j >= 0 else None for j in op.InputsAsNumpy()) \
        if op.InputsLength() else ()
    outs = tuple(tensors[j] for j in op.OutputsAsNumpy()) if op.OutputsLength() else ()
    options = schema.BuiltinOptionsCreator(op.BuiltinOptionsType(), op.BuiltinOptions())
    ops.append(_Op(i, name, is_custom, ins, outs, options))
  return ops


def _fold_dequantized_constants(ops: list[_Op]) -> list[_Op]:
  """Treats DEQUANTIZE(constant) outputs as constants, as the GPU delegate does.

  fp16 export stores weights as float16 constants behind DEQUANTIZE; the delegate
  folds those into its own constants, so a FULLY_CONNECTED fed by one still has a
  single runtime input.
  """
  folded = {op.outputs[0].index for op in ops
            if op.name == 'DEQUANTIZE' and op.inputs and op.inputs[0] is not None
            and op.inputs[0].is_const and len(op.outputs) == 1}
  if not folded:
    return ops
  fix = lambda t: dataclasses.replace(t, is_const=True) if t is not None and t.index in folded \
      else t
  return [dataclasses.replace(op, inputs=tuple(map(fix, op.inputs)),
                              outputs=tuple(map(fix, op.outputs))) for op in ops]


def _runtime(tensors) -> list[_Tensor]:
  return [t for t in tensors if t is not None and not t.is_const]


def _op_problems(op: _Op) -> list[str]:
  """The per-op conditions of gpu_compatibility.cc that matter for our graphs."""
  name, ins, outs, opt = op.name, op.inputs, op.outputs, op.options
  problems = []
  activation = getattr(opt, 'fusedActivationFunction', None)
  if activation == _SIGN_BIT:
    problems.append('fused SIGN_BIT activation is not supported')
  n_runtime = len(_runtime(ins))
  if name in ('ADD', 'MUL') and len(ins) != 2:
    problems.append(f'{name} needs exactly 2 inputs, has {len(ins)}')
  if name == 'ADD_N' and len(ins) != 2:
    problems.append(f'ADD_N supports only 2 inputs, has {len(ins)}')
  if name == 'MUL' and len(ins) == 2 and len(ins[0].shape) == len(ins[1].shape):
    a, b = ins[0].shape, ins[1].shape
    if any(x < y for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b)):
      problems.append(f'MUL broadcasts both operands ({list(a)} x {list(b)})')
  if name in ('MEAN', 'SUM', 'REDUCE_MAX', 'REDUCE_MIN', 'REDUCE_PROD'):
    axes = ins[1] if len(ins) > 1 else None
    if axes is None or not axes.is_const or axes.dtype != _T.INT32:
      problems.append(f'{name} needs constant int32 axes')
  if name in ('SLICE', 'STRIDED_SLICE') and len(ins[0].shape) not in (3, 4):
    problems.append(f'{name} supports only 3-D or 4-D inputs, got rank {len(ins[0].shape)}')
  if name == 'STRIDED_SLICE' and opt is not None:
    for mask in ('ellipsisMask', 'newAxisMask', 'shrinkAxisMask'):
      if getattr(opt, mask, 0):
        problems.append(f'STRIDED_SLICE {mask} is not supported')
  if name in ('PAD', 'PADV2', 'MIRROR_PAD') and len(ins) > 1 and ins[1] is not None:
    if ins[1].shape not in ((3, 2), (4, 2)):
      problems.append(f'{name} paddings must be 3x2 or 4x2, got {list(ins[1].shape)}')
  if name == 'MIRROR_PAD' and opt is not None and opt.mode != schema.MirrorPadMode.REFLECT:
    problems.append('MIRROR_PAD supports only REFLECT mode')
  if name == 'FULLY_CONNECTED' and opt is not None:
    if opt.weightsFormat != schema.FullyConnectedOptionsWeightsFormat.DEFAULT:
      problems.append('FULLY_CONNECTED with shuffled weights format')
    if ins[0].is_const:
      problems.append('FULLY_CONNECTED with a constant input')
    if n_runtime > 2:
      problems.append('FULLY_CONNECTED with more than 2 runtime inputs')
    if opt.keepNumDims and len(ins[0].shape) != len(outs[0].shape):
      problems.append('FULLY_CONNECTED keep_num_dims with rank-changing output')
  if name == 'SOFTMAX' and opt is not None and opt.beta != 1.0:
    problems.append(f'SOFTMAX beta={opt.beta} (only 1.0 supported)')
  if name == 'DEPTHWISE_CONV_2D' and len(ins[0].shape) == 4 and len(outs[0].shape) == 4:
    # Newer converters leave depth_multiplier at 0, so derive it from the shapes.
    c_in, c_out = ins[0].shape[-1], outs[0].shape[-1]
    if c_out != c_in and c_in != 1:
      problems.append(f'DEPTHWISE_CONV_2D channel multiplier {c_in} -> {c_out} with input '
                      'channels != 1')
  if name == 'GATHER':
    if ins[0].dtype == _T.INT32:
      problems.append('GATHER of int32 data')
    if len(ins[1].shape) != 1 or ins[1].dtype != _T.INT32:
      problems.append('GATHER needs 1-D int32 indices')
  if name == 'CAST':
    src, dst = ins[0].dtype, outs[0].dtype
    ok = ((src == _T.BOOL and dst in _FLOATS) or (src in _FLOATS and dst == _T.BOOL)
          or (src in (_T.FLOAT32, _T.INT32) and dst in (_T.FLOAT32, _T.INT32)))
    if not ok:
      problems.append(f'CAST {_TYPE_NAMES.get(src)} -> {_TYPE_NAMES.get(dst)} is not supported')
  if name in ('SELECT', 'SELECT_V2'):
    for branch in ins[1:3]:
      same = branch.shape == outs[0].shape
      scalar = branch.is_const and int(np.prod(branch.shape, dtype=np.int64)) <= 1
      if branch.dtype not in _FLOATS or not (same or scalar):
        problems.append(f'{name} branch {branch.name} must be float and output-shaped '
                        'or a constant scalar')
  if name in ('RESHAPE', 'TILE', 'TRANSPOSE') and n_runtime != 1:
    problems.append(f'{name} needs exactly 1 runtime input, has {n_runtime}')
  return problems


def _tensor_findings(op: _Op, sg: int) -> list[Finding]:
  out = []
  slots = _NONFLOAT_INPUT_SLOTS.get(op.name, {})
  touched = [(t, 'in', k) for k, t in enumerate(op.inputs) if t is not None]
  touched += [(t, 'out', k) for k, t in enumerate(op.outputs)]
  for t, role, k in touched:
    def add(kind, reason, t=t):
      out.append(Finding(kind, sg, op.index, op.name, (t.describe(),), reason))
    if len(t.shape) > 4:
      add('rank', f'rank-{len(t.shape)} tensor (GPU delegate takes rank <= 4)')
    if any(d < 0 for d in t.signature) or any(d < 0 for d in t.shape):
      add('dynamic', 'dynamic dimension (-1) in shape signature')
    if t.dtype in _FLOATS:
      continue
    if t.dtype == _T.INT64:
      add('dtype', 'int64 tensor (GPU delegate has no int64)')
    elif t.is_const:
      if t.dtype == _T.INT32 or (op.name == 'DEQUANTIZE' and t.dtype in (_T.INT8, _T.UINT8)):
        continue  # Shape / axis / permutation parameters and quantized weights.
      add('dtype', f'constant {t.dtype_name} tensor is not a parameter the GPU delegate reads')
    elif role == 'in' and t.dtype in slots.get(k, ()):
      continue
    elif role == 'out' and t.dtype in _NONFLOAT_OUTPUTS.get(op.name, ()):
      continue
    else:
      add('dtype', f'{t.dtype_name} compute tensor (GPU delegate computes in float16/float32)')
  return out


def check_model(model: bytes | str | Path) -> list[Finding]:
  """All GPU-delegate findings for a `.tflite` file path or its bytes; [] means clean."""
  data, m = _load_model(model)
  findings = []
  if m.SubgraphsLength() > 1:
    findings.append(Finding('subgraph', 0, None, None, (),
                            f'{m.SubgraphsLength()} subgraphs (control flow / CALL_ONCE); '
                            'the GPU delegate takes only the primary subgraph'))
  for sg in range(m.SubgraphsLength()):
    subgraph = m.Subgraphs(sg)
    tensors = _read_tensors(m, subgraph)
    for j in subgraph.InputsAsNumpy() if subgraph.InputsLength() else ():
      t = tensors[j]
      if any(d < 0 for d in t.signature):
        findings.append(Finding('dynamic', sg, None, None, (t.describe(),),
                                'graph input has a dynamic dimension'))
    for op in _fold_dequantized_constants(_read_ops(m, subgraph, tensors)):
      names = tuple(t.describe() for t in op.inputs + op.outputs if t is not None)
      if op.is_custom:
        if op.name not in GPU_CUSTOM_OPS:
          kind = 'Flex (TensorFlow) op' if op.name.startswith('Flex') else 'custom op'
          findings.append(Finding('custom', sg, op.index, op.name, names,
                                  f'{kind} {op.name!r} has no GPU delegate kernel'))
      elif op.name not in GPU_BUILTIN_OPS:
        reason = _KNOWN_BAD.get(op.name, f'{op.name} is not in the GPU delegate op list')
        findings.append(Finding('op', sg, op.index, op.name, names, reason))
      else:
        for problem in _op_problems(op):
          findings.append(Finding('op', sg, op.index, op.name, names, problem))
      findings.extend(_tensor_findings(op, sg))
  return findings


def fp16_sum_risks(model: bytes | str | Path, max_terms: int = 4096) -> list[str]:
  """SUM reductions over more than `max_terms` elements, as readable warnings.

  Not delegate findings: the GPU delegate runs them. But JAX lowers `jnp.mean` to
  SUM followed by MUL(1/N), so a mean over 32768 positions is a float16 sum that
  overflows (65504) once the mean |x| passes 2. Reducing in stages (over W, then
  H, then the group) keeps every partial sum small.
  """
  _, m = _load_model(model)
  warnings = []
  for sg in range(m.SubgraphsLength()):
    subgraph = m.Subgraphs(sg)
    for op in _read_ops(m, subgraph, _read_tensors(m, subgraph)):
      if op.name != 'SUM' or len(op.inputs) < 2 or op.inputs[1].int_data is None:
        continue
      shape = op.inputs[0].shape
      terms = int(np.prod([shape[a] for a in op.inputs[1].int_data], dtype=np.int64))
      if terms > max_terms:
        warnings.append(f'subgraph {sg} op #{op.index} SUM over {terms} elements of '
                        f'{op.inputs[0].describe()} (float16 overflow past 65504)')
  return warnings


def op_histogram(model: bytes | str | Path) -> dict[str, int]:
  """Op name -> count over all subgraphs, most frequent first."""
  _, m = _load_model(model)
  counts = collections.Counter()
  for sg in range(m.SubgraphsLength()):
    subgraph = m.Subgraphs(sg)
    counts.update(op.name for op in _read_ops(m, subgraph, _read_tensors(m, subgraph)))
  return dict(counts.most_common())


class GpuCheckError(ValueError):
  """Raised by `assert_gpu_clean` with every finding in the message."""


def assert_gpu_clean(model: bytes | str | Path, label: str = 'model') -> None:
  """Raises GpuCheckError listing all findings unless the model is GPU-delegate clean."""
  findings = check_model(model)
  if findings:
    lines = '\n  '.join(str(f) for f in findings[:50])
    more = f'\n  ... and {len(findings) - 50} more' if len(findings) > 50 else ''
    raise GpuCheckError(f'{label}: {len(findings)} GPU delegate finding(s):\n  {lines}{more}')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('models', nargs='+', type=Path, help='.tflite files')
  parser.add_argument('--quiet', action='store_true', help='print findings only')
  args = parser.parse_args(argv)
  total = 0
  for path in args.models:
    try:
      findings = check_model(path)
    except (OSError, ValueError) as e:
      print(f'{path}: error: {e}', file=sys.stderr)
      return 2
    if not args.quiet:
      ops = ', '.join(f'{k} x{v}' for k, v in op_histogram(path).items())
      print(f'{path}: ops: {ops}')
    for f in findings:
      print(f'{path}: {f}')
    for w in fp16_sum_risks(path):
      print(f'{path}: warning: {w}')
    print(f'{path}: {len(findings)} finding(s)')
    total += len(findings)
  return 1 if total else 0


if __name__ == '__main__':
  sys.exit(main())
