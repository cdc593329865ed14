// moet with pretrained hosts: everything in moet.hpp plus decoder models (GPT-2, Llama), their
// checkpoints (safetensors, config.json, adapter files), generation, and CALM composition. The
// models are written once over backend ops (include/moet/model/); this header brings the CPU's.
#pragma once

#include "calm.hpp"
#include "cpu/composition.hpp"
#include "cpu/decoder.hpp"
#include "cpu/ops.hpp"
#include "io/config.hpp"
#include "io/model_io.hpp"
#include "io/safetensors.hpp"
#include "model.hpp"
#include "model/batch.hpp"
#include "model/composition.hpp"
#include "model/decoder.hpp"
#include "model/sampling.hpp"
#include "moet.hpp"
