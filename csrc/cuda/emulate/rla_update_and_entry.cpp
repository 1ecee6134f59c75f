// ../rla_update_and_entry.cu compiled as host C++ for the emulator (the build defines RLA_EXT_EMULATE_CUDA).
#ifndef RLA_EXT_EMULATE_CUDA
#error "csrc/cuda/emulate/ is built only by the emulator (tests/cuda_emulation.py), with RLA_EXT_EMULATE_CUDA"
#endif
#include "../rla_update_and_entry.cu"
