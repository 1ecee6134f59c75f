"""Triton kernels of rla_ext, installed as ``rla_ext.triton_kernels``.

Each op module (``concat_conv_bn_act``, ``rla_update``) exposes the kernel pair ``forward`` /
``backward`` described in docs/ARCHITECTURE.md. Nothing is imported here so that importing the
package does not pull in Triton until an op module is actually used.
"""
