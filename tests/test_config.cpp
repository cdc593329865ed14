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
          "field 'n_embd' must be a positive integer, got 0");
  rejects(R"({"model_type":"gpt2","vocab_size":10,"n_embd":"8","n_layer":2,"n_head":2,"n_positions":16})",
          "must be a positive integer, got \"8\"");
  rejects(R"({"model_type":"gpt2","vocab_size":10,"n_embd":10,"n_layer":2,"n_head":4,"n_positions":16})",
          "hidden size 10 is not a multiple of the 4 attention heads");
  rejects(R"({"model_type":"gpt2","layer_norm_epsilon":-1,)" + base + "}", "'layer_norm_epsilon' must be a positive number");
  const std::string llama = R"("model_type":"llama","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,"intermediate_size":16)";
  rejects("{" + llama + R"(,"num_attention_heads":4,"num_key_value_heads":3})", "4 attention heads are not a multiple of the 3 key/value heads");
  rejects("{" + llama + R"(,"num_attention_heads":8})", "head dim 1 must be even");
  rejects("{" + llama + R"(,"num_attention_heads":2,"tie_word_embeddings":1})", "'tie_word_embeddings' must be true or false");
  REQUIRE_THROWS_WITH(load_model_config("/nonexistent/config.json"), Contains("cannot open"));
}
