from models.tokenizer import SPECIAL_TOKENS, train_tokenizer

CORPUS = [
    "¿Dónde está la biblioteca?",
    "Where is the library?",
    'I don\'t know, "Tom".',
    "No lo sé.",
    "Ella tiene veintidós años.",
    "She is twenty-two years old.",
] * 20


def test_round_trip_and_special_ids():
    tok = train_tokenizer(CORPUS, vocab_size=300)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    for text in set(CORPUS):
        assert tok.decode(tok.encode(text).ids) == text
    assert "?" in tok.encode("Where is the library?").tokens  # punctuation is its own token
