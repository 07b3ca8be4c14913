#pragma once
#include "fastlm_emu.h"
#include "fastlm_emu_half.h"
#include "fastlm_emu_ptx.h"
