"""The embedded corpus: deterministic, indexable, three distinct languages, usable tasks."""

import collections
import difflib

import numpy as np
import pytest

from ul2_lm.data import corpus as corpus_lib


@pytest.fixture(scope="module")
def world():
    return corpus_lib.Corpus(seed=0)


def test_an_example_is_a_pure_function_of_seed_split_and_index(world):
    fresh = corpus_lib.Corpus(seed=0)
    for i in [0, 7, 123_456_789]:
        assert world.monolingual("train", i) == fresh.monolingual("train", i)
        assert world.parallel("test", i) == fresh.parallel("test", i)
        assert world.summarization("validation", i, "xde") == fresh.summarization("validation", i, "xde")


def test_seed_and_split_change_the_data(world):
    other = corpus_lib.Corpus(seed=1)
    texts = {world.monolingual("train", 3), world.monolingual("validation", 3),
             world.monolingual("test", 3), other.monolingual("train", 3)}
    assert len(texts) == 4
    assert world.lexicon("xen").nouns != other.lexicon("xen").nouns


def test_the_stream_is_indexable_from_any_start(world):
    stream = world.iter_monolingual("train", start=500)
    assert [next(stream) for _ in range(5)] == [world.monolingual("train", i) for i in range(500, 505)]


def test_pretraining_text_mixes_the_two_languages_but_not_the_related_one(world):
    langs = collections.Counter(world.monolingual("train", i)[0] for i in range(2000))
    assert set(langs) == {"xen", "xde"}
    assert langs["xen"] / 2000 == pytest.approx(0.5, abs=0.05)


def _words(texts):
    return {w.strip(".") for t in texts for w in t.split() if not w[0].isupper()}


def test_the_three_languages_have_different_surface_words(world):
    pairs = [world.parallel("train", i, "xen", "xde") for i in range(300)]
    xen, xde = _words(p[0] for p in pairs), _words(p[1] for p in pairs)
    xsc = _words(world.parallel("train", i, "xen", "xsc")[1] for i in range(300))
    assert len(xen & xde) / len(xen | xde) < 0.05
    assert len(xen & xsc) / len(xen | xsc) < 0.6  # cognates: some survive the sound changes
    assert xsc != xen


def test_the_related_language_shares_roots_with_the_source(world):
    xen, xde, xsc = (world.lexicon(lang) for lang in ("xen", "xde", "xsc"))
    assert xsc.nouns == tuple(corpus_lib.sound_change(w) for w in xen.nouns)
    changed = np.mean([a != b for a, b in zip(xen.nouns, xsc.nouns)])
    assert changed > 0.3  # the sound changes touch a good share of the roots
    similarity = lambda a, b: np.mean([difflib.SequenceMatcher(None, x, y).ratio()  # noqa: E731
                                       for x, y in zip(a.verbs, b.verbs)])
    assert similarity(xen, xsc) > 0.75 > 0.4 > similarity(xen, xde)


def test_lexicon_has_a_few_thousand_words_with_zipfian_use(world):
    lex = world.lexicon("xen")
    assert 2000 < len(lex.nouns) + len(lex.verbs) + len(lex.adjectives) < 5000
    counts = collections.Counter(w for i in range(3000) for w in world.monolingual("train", i)[1].split())
    freqs = np.array(sorted(counts.values(), reverse=True), dtype=float)
    ranks = np.arange(1, len(freqs) + 1)
    slope = np.polyfit(np.log(ranks[10:1000]), np.log(freqs[10:1000]), 1)[0]
    assert len(counts) > 2000 and -2.0 < slope < -0.6


def test_parallel_pairs_differ_in_word_order(world):
    verbs = {"xen": set(world.lexicon("xen").verbs), "xde": set(world.lexicon("xde").verbs)}
    xen_final = xde_final = total = 0
    for i in range(300):
        doc = world.parallel_document("train", i)
        if len(doc.facts) != 1 or doc.facts[0].object is None:
            continue
        src, tgt = world.parallel("train", i)
        total += 1
        last_src = src.rstrip(".").split()[-1]
        last_tgt = tgt.rstrip(".").split()[-1]
        xen_final += any(last_src.startswith(v) and len(last_src) - len(v) <= 2 for v in verbs["xen"])
        xde_final += any(last_tgt.startswith(v) and len(last_tgt) - len(v) <= 3 for v in verbs["xde"])
    assert total > 50
    assert xde_final == total  # SOV: the verb closes every xde clause
    assert xen_final < 0.2 * total  # SVO: an object follows the xen verb


def test_summaries_are_shorter_than_documents_and_entailed_by_them(world):
    for i in range(300):
        doc = world.document("train", i)
        cores = {f.core for f in doc.facts}
        assert doc.summary and all(f.core in cores for f in doc.summary)
        text, summary = world.summarization("train", i, "xen")
        assert len(summary.split()) < len(text.split())


def test_languages_are_checked():
    with pytest.raises(ValueError, match="xfr"):
        corpus_lib.Corpus(0).parallel("train", 0, "xen", "xfr")
    with pytest.raises(ValueError, match="dev"):
        corpus_lib.Corpus(0).monolingual("dev", 0)


def test_bitext_documents_are_a_passage_and_its_translation_at_their_rate():
    from ul2_lm.data import sources

    plain = sources.EmbeddedSource(corpus_seed=0)
    mixed = sources.EmbeddedSource(corpus_seed=0, bitext_rate=0.25)
    docs = [mixed.text("train", i) for i in range(40)]
    assert [t for _, (_, t) in zip(range(40), mixed.documents("train", seed=0))] == docs
    bitext = [i for i, t in enumerate(docs) if " = " in t]
    assert len(bitext) == 10 and bitext == list(range(3, 40, 4))  # evenly spread
    world = corpus_lib.Corpus(0)
    for i in bitext:
        assert docs[i] == world.bitext("train", i)
        left, right = docs[i].split(" = ")
        # The same story on both sides: as many sentences, the same names, other words.
        assert left.count(".") == right.count(".") >= 1
        names = lambda text: sorted(w for w in text.split() if w[0].isupper())  # noqa: E731
        assert names(left) == names(right)
        assert set(left.lower().split()) != set(right.lower().split())
    # The monolingual documents are the ones a source without bitext yields at those indices.
    assert all(docs[i] == plain.text("train", i) for i in range(40) if i not in bitext)
    assert repr(plain) != repr(mixed)
