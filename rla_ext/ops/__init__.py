"""The fused RLA ops. See each function's docstring for shapes, and docs/ARCHITECTURE.md."""
from rla_ext.ops.concat_conv3x3_bn_act import concat_conv3x3_bn_act
from rla_ext.ops.concat_conv_bn_act import concat_conv_bn_act
from rla_ext.ops.conv_gru_cell import conv_gru_cell
from rla_ext.ops.conv_lstm_cell import conv_lstm_cell
from rla_ext.ops.rla_update import rla_update
from rla_ext.ops.rla_update_and_entry import rla_update_and_entry

__all__ = ["concat_conv3x3_bn_act", "concat_conv_bn_act", "conv_gru_cell", "conv_lstm_cell", "rla_update",
           "rla_update_and_entry"]
