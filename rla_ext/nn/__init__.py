"""Drop-in modules built on the fused RLA ops.

* :class:`RLABottleneck`, :class:`RLABasicBlock`: ``x_t = block(x, h)``.
* :func:`rla_step`, :class:`RLAAggregator`: the per-stage RLA update; :func:`rla_boundary`: the update
  and the next bottleneck's entry in one op.
* :class:`SqueezeExcite`, :class:`EfficientChannelAttention`: optional branch attention.
* :class:`ConvGRUCell`, :class:`ConvLSTMCell`: the released GRU / LSTM aggregation cells (plain PyTorch).
* :class:`EarlyExitHead`: a classifier on the RLA state at an intermediate depth.
* :func:`bn_args`: nn.BatchNorm2d's momentum / running-stat bookkeeping for fused ops.
* :class:`SyncBatchNorm2d`, :func:`convert_sync_batchnorm`: BatchNorm statistics synchronised over
  torch.distributed ranks (CPU/gloo and GPU), including those the fused ops compute.
"""
from rla_ext.nn._bn_args import BNArgs, bn_args
from rla_ext.nn.aggregator import RLAAggregator, boundary_pays, check_rla_convs, rla_boundary, rla_step
from rla_ext.nn.attention import EfficientChannelAttention, SqueezeExcite
from rla_ext.nn.blocks import RLABasicBlock, RLABottleneck, make_downsample
from rla_ext.nn.conv_rnn import ConvGRUCell, ConvLSTMCell
from rla_ext.nn.early_exit import EarlyExitHead
from rla_ext.nn.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm

__all__ = ["BNArgs", "bn_args", "RLAAggregator", "boundary_pays", "check_rla_convs", "rla_boundary", "rla_step",
           "EfficientChannelAttention", "SqueezeExcite", "ConvGRUCell", "ConvLSTMCell", "RLABasicBlock",
           "RLABottleneck", "make_downsample", "EarlyExitHead", "SyncBatchNorm2d", "convert_sync_batchnorm"]
