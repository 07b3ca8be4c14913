// cuda.h for the CUDA emulator (tests/cuda_emu): the driver API pieces the Hopper kernels' host
// code uses (tensor maps), implemented in fastlm_emu_sm90.h.
#pragma once
#include "fastlm_emu.h"
#include "fastlm_emu_sm90_host.h"
