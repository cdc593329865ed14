// config.json parsing for GPT-2 and Llama, with defaults and every rejected field.
#include <catch2/catch.hpp>

#include <moet/io/config.hpp>

using namespace moet;
using namespace moet::io;
using Catch::Matchers::Contains;

TEST_CASE("GPT-2 and Llama configs", "[io][config]") {
  const ModelConfig gpt2 = parse_model_config(
      R"({"model_type":"gpt2","vocab_size":50257,"n_embd":768,"n_layer":12,"n_head":12,"n_positions":1024,"n_inner":null,"layer_norm_epsilon":1e-5})");
  REQUIRE(gpt2.architecture == Architecture::gpt2);
  REQUIRE(gpt2.d_ff == 3072);
  REQUIRE(gpt2.kv_heads == 12);
  REQUIRE(gpt2.head_dim() == 64);
  REQUIRE(gpt2.tied_embeddings);

  const ModelConfig llama = parse_model_config(
      R"({"model_type":"llama","vocab_size":32000,"hidden_size":4096,"num_hidden_layers":32,"num_attention_heads":32,
          "num_key_value_heads":8,"intermediate_size":11008,"rms_norm_eps":1e-5,"rope_theta":500000.0,"max_position_embeddings":4096})");
  REQUIRE(llama.architecture == Architecture::llama);
  REQUIRE(llama.kv_heads == 8);
  REQUIRE(llama.rope_theta == 500000.0);
  REQUIRE_FALSE(llama.tied_embeddings);
  REQUIRE(llama.norm_eps == 1e-5);
}

TEST_CASE("Bad configs are rejected with the field named", "[io][config][errors]") {
  auto rejects = [](const std::string& text, const std::string& message) {
    INFO(text);
    REQUIRE_THROWS_AS(parse_model_config(text, "my/config.json"), format_error);
    REQUIRE_THROWS_WITH(parse_model_config(text, "my/config.json"), Contains("my/config.json") && Contains(message));
  };
  const std::string base = R"("vocab_size":10,"n_embd":8,"n_layer":2,"n_head":2,"n_positions":16)";
  rejects("{", "malformed JSON");
  rejects("[]", "not a JSON object");
  rejects("{" + base + "}", "field 'model_type' is missing");
  rejects(R"({"model_type":"t5",)" + base + "}", "model_type 't5' is not supported");
  rejects(R"({"model_type":"gpt2","vocab_size":10,"n_layer":2,"n_head":2,"n_positions":16})", "field 'n_embd' is missing");
  rejects(R"({"model_type":"gpt2","vocab_size":10,"n_embd":0,"n_layer":2,"n_head":2,"n_positions":16})",
          "field 'n_embd' must be a positive integer of at most 2147483647, got 0");
  rejects(R"({"model_type":"gpt2","vocab_size":10,"n_embd":"8","n_layer":2,"n_head":2,"n_positions":16})",
          "must be a positive integer of at most 2147483647, got \"8\"");
  rejects(R"({"model_type":"gpt2","vocab_size":10,"n_embd":10,"n_layer":2,"n_head":4,"n_positions":16})",
          "hidden size 10 is not a multiple of the 4 attention heads");
  rejects(R"({"model_type":"gpt2","layer_norm_epsilon":-1,)" + base + "}", "'layer_norm_epsilon' must be a positive finite number");
  const std::string llama = R"("model_type":"llama","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,"intermediate_size":16)";
  rejects("{" + llama + R"(,"num_attention_heads":4,"num_key_value_heads":3})", "4 attention heads are not a multiple of the 3 key/value heads");
  rejects("{" + llama + R"(,"num_attention_heads":8})", "head dim 1 must be even");
  rejects("{" + llama + R"(,"num_attention_heads":2,"tie_word_embeddings":1})", "'tie_word_embeddings' must be true or false");
  REQUIRE_THROWS_WITH(load_model_config("/nonexistent/config.json"), Contains("cannot open"));
}

TEST_CASE("Math-changing config fields are applied or refused by name", "[io][config][hf]") {
  const std::string llama = R"("model_type":"llama","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,"intermediate_size":16,"num_attention_heads":2)";
  const ModelConfig plain = parse_model_config("{" + llama + "}");
  REQUIRE(plain.rope_scaling.type == RopeScaling::Type::none);
  REQUIRE_FALSE(plain.attention_bias);
  REQUIRE_FALSE(plain.mlp_bias);
  REQUIRE(plain.head_dim() == 4);

  const ModelConfig applied = parse_model_config(
      "{" + llama + R"(,"head_dim":6,"attention_bias":true,"mlp_bias":true,"hidden_act":"silu","max_position_embeddings":64,
                       "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
                                       "original_max_position_embeddings":16}})");
  REQUIRE(applied.head_dim() == 6);
  REQUIRE(applied.attention_bias);
  REQUIRE(applied.mlp_bias);
  REQUIRE(applied.rope_scaling.type == RopeScaling::Type::llama3);
  REQUIRE(applied.rope_scaling.factor == 8.0);
  REQUIRE(applied.rope_scaling.original_max_positions == 16);
  const ModelConfig linear = parse_model_config("{" + llama + R"(,"rope_scaling":{"type":"linear","factor":2}})");
  REQUIRE(linear.rope_scaling.type == RopeScaling::Type::linear);
  REQUIRE(linear.rope_scaling.factor == 2.0);
  const ModelConfig dynamic =
      parse_model_config("{" + llama + R"(,"max_position_embeddings":128,"rope_scaling":{"rope_type":"dynamic","factor":4}})");
  REQUIRE(dynamic.rope_scaling.type == RopeScaling::Type::dynamic);
  REQUIRE(dynamic.rope_scaling.original_max_positions == 128);
  REQUIRE(parse_model_config("{" + llama + R"(,"rope_scaling":{"rope_type":"default"}})").rope_scaling.type ==
          RopeScaling::Type::none);

  const std::string gpt2 = R"("model_type":"gpt2","vocab_size":10,"n_embd":8,"n_layer":2,"n_head":2,"n_positions":16)";
  REQUIRE(parse_model_config("{" + gpt2 + "}").activation == Activation::gelu_tanh);
  for (auto [name, kind] : {std::pair{"gelu_new", Activation::gelu_tanh}, {"gelu_pytorch_tanh", Activation::gelu_tanh},
                            {"gelu_fast", Activation::gelu_tanh}, {"gelu", Activation::gelu}, {"relu", Activation::relu},
                            {"silu", Activation::silu}, {"swish", Activation::silu}})
    REQUIRE(parse_model_config("{" + gpt2 + R"(,"activation_function":")" + name + "\"}").activation == kind);
  REQUIRE_FALSE(parse_model_config("{" + gpt2 + R"(,"tie_word_embeddings":false})").tied_embeddings);
  // Fields that do not change the function are accepted (dropout: moet trains without it).
  REQUIRE_NOTHROW(parse_model_config("{" + gpt2 + R"(,"resid_pdrop":0.1,"embd_pdrop":0.1,"attn_pdrop":0.1,"scale_attn_weights":true})"));

  auto rejects = [](const std::string& text, const std::string& message) {
    INFO(text);
    REQUIRE_THROWS_AS(parse_model_config(text), format_error);
    REQUIRE_THROWS_WITH(parse_model_config(text), Contains(message));
  };
  rejects("{" + gpt2 + R"(,"activation_function":"quick_gelu"})", "field 'activation_function' is 'quick_gelu'");
  rejects("{" + gpt2 + R"(,"scale_attn_weights":false})", "field 'scale_attn_weights' is false");
  rejects("{" + gpt2 + R"(,"scale_attn_by_inverse_layer_idx":true})", "field 'scale_attn_by_inverse_layer_idx' is true");
  rejects("{" + gpt2 + R"(,"add_cross_attention":true})", "field 'add_cross_attention' is true");
  rejects("{" + llama + R"(,"rope_scaling":{"rope_type":"yarn","factor":4}})", "rope_scaling' has type 'yarn'");
  rejects("{" + llama + R"(,"rope_scaling":{"rope_type":"longrope","factor":4}})", "type 'longrope'");
  rejects("{" + llama + R"(,"rope_scaling":{"rope_type":"linear"}})", "of type 'linear' needs 'factor'");
  rejects("{" + llama + R"(,"rope_scaling":{"rope_type":"linear","factor":0.5}})", "'rope_scaling.factor' must be >= 1");
  rejects("{" + llama + R"(,"rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4}})",
          "needs 'original_max_position_embeddings'");
  rejects("{" + llama + R"(,"rope_scaling":{"factor":2}})", "has no 'rope_type'");
  rejects("{" + llama + R"(,"rope_scaling":"linear"})", "'rope_scaling' must be an object or null");
  rejects("{" + llama + R"(,"hidden_act":"gelu"})", "field 'hidden_act' is \"gelu\"");
  rejects("{" + llama + R"(,"partial_rotary_factor":0.5})", "field 'partial_rotary_factor' is 0.5");
  rejects("{" + llama + R"(,"sliding_window":4096})", "field 'sliding_window' is 4096");
  rejects("{" + llama + R"(,"head_dim":5})", "head dim 5 must be even");
  rejects("{" + llama + R"(,"head_dim":0})", "field 'head_dim' must be a positive integer");
  rejects("{" + llama + R"(,"attention_bias":"yes"})", "'attention_bias' must be true or false");
}
