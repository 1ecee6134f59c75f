"""The `torch` backend: plain PyTorch autograd ops computing exactly the published RLA-Net math."""
from rla_ext._reference.concat_conv3x3_bn_act import concat_conv3x3_bn_act
from rla_ext._reference.concat_conv_bn_act import concat_conv_bn_act
from rla_ext._reference.conv_gru_cell import conv_gru_cell
from rla_ext._reference.conv_lstm_cell import conv_lstm_cell
from rla_ext._reference.rla_update import rla_update

__all__ = ["concat_conv3x3_bn_act", "concat_conv_bn_act", "conv_gru_cell", "conv_lstm_cell", "rla_update"]
