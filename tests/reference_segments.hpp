// Tokenizer::encode_segments the plain way, as a reference: the text up to every segment's end
// encoded from the start, and an id given to the last segment whose prefix encodes to it (the
// rule encode_segments documents). encode_segments must return what this returns
// (test_tokenizer); moet_bench_tokenizer times it against this on long chats.
#pragma once

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include <moet/text/tokenizer.hpp>

namespace moet::testing {

inline std::pair<std::vector<int>, std::vector<bool>> encode_segments_by_prefixes(const text::Tokenizer& tok,
                                                                                  const std::vector<text::ChatSegment>& segments,
                                                                                  const text::EncodeOptions& options = {}) {
  text::EncodeOptions body = options;
  body.add_special_tokens = false;
  std::string all;
  for (const text::ChatSegment& s : segments) all += s.text;
  const std::vector<int> whole = tok.encode(all, body);
  // the template's prefix and suffix: what encode adds around a body ("x")
  const std::vector<int> bare = tok.encode("x", body), framed = tok.encode("x", options);
  const auto at = std::search(framed.begin(), framed.end(), bare.begin(), bare.end());
  const std::vector<int> prefix(framed.begin(), at), suffix(at + std::ptrdiff_t(bare.size()), framed.end());
  std::vector<int> ids = prefix;
  std::vector<bool> trained(prefix.size(), false);
  std::size_t end = 0, done = 0;
  for (std::size_t k = 0; k < segments.size(); ++k) {
    end += segments[k].text.size();
    std::size_t cut = whole.size();
    if (k + 1 < segments.size()) {
      const std::vector<int> head = tok.encode(all.substr(0, end), body);
      cut = std::size_t(std::mismatch(head.begin(), head.end(), whole.begin(), whole.end()).first - head.begin());
    }
    cut = std::max(cut, done);
    ids.insert(ids.end(), whole.begin() + std::ptrdiff_t(done), whole.begin() + std::ptrdiff_t(cut));
    trained.insert(trained.end(), cut - done, segments[k].trained);
    done = cut;
  }
  ids.insert(ids.end(), suffix.begin(), suffix.end());
  trained.insert(trained.end(), suffix.size(), !segments.empty() && segments.back().trained);
  return {ids, trained};
}

}  // namespace moet::testing
