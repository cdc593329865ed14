// Whole models on the GPU: the decoder (GPT-2, Llama) and CALM written once in
// include/moet/model/, over the CUDA backend's ops (ops.hpp) and layers (layers.hpp).
//
//   #include <moet/cuda/models.hpp>
//   moet::CudaContext ctx;
//   using M = moet::Decoder<moet::Llama, moet::Slots<moet::at<moet::slot::q, moet::MoLoRA<4, 8>>>>;
//   M::model<moet::bf16, moet::cuda> model(ctx, config, rng);
//   moet::CudaAdamW opt(ctx, {.lr = 1e-3});
//   moet::TrainStepResult r = model.train_step(batch, opt);
//
// Link moet::cuda (the kernels). The CPU's models come with <moet/models.hpp>.
#pragma once

#include "../model.hpp"
#include "../model/batch.hpp"
#include "../model/composition.hpp"
#include "../model/decoder.hpp"
#include "../model/sampling.hpp"
#include "composition_layer.hpp"
#include "layers.hpp"
#include "ops.hpp"
