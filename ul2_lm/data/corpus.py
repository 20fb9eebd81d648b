"""The embedded bilingual corpus: a seeded generator of a small synthetic world and its languages.

A world holds a few thousand concepts (person roles, animals, objects, foods, places, verbs with
selectional preferences, adjectives, names, times and numbers) drawn with Zipfian frequencies.
A document is a short story about a protagonist: a list of facts (who did what to whom, where,
when, negated or not) with in-document reference (first mention indefinite, later definite,
pronouns for a repeated subject). The same facts are realised in three languages:

- `xen` (the source): SVO, articles, adjective before the noun, plural and past-tense suffixes,
  third-person agreement on present-tense verbs.
- `xde` (the target): SOV with the verb last, three genders, case-marked determiners,
  adjectives after the noun agreeing in gender and number, verbs agreeing in number and tense,
  postpositions; its own lexicon.
- `xsc` (related to the source, for zero-shot tests): xen's grammar and roots after a fixed
  list of regular sound changes; never in the pretraining mix.

Everything is a pure function of (seed, split, index): monolingual text for pretraining
(`monolingual`), sentence pairs for translation (`parallel`) and document/summary pairs for
summarisation (`summarization`, the summary being the protagonist's key facts without the
scene). Nothing is stored on disk. Pure python and numpy.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
from collections.abc import Iterator, Sequence

import numpy as np

VERSION = 1  # bump whenever generated text changes: the vocabulary cache keys on it
LANGUAGES = ("xen", "xde", "xsc")
PRETRAINING_LANGUAGES = ("xen", "xde")
LANGUAGE_NAMES = {"xen": "Xenglish", "xde": "Xdeutsch", "xsc": "Xscots"}
SPLITS = ("train", "validation", "test")
_KINDS = {"monolingual": 1, "parallel": 2, "summarization": 3, "bitext": 4}

_CATEGORIES = ("person", "animal", "object", "food", "place")
_NOUNS_PER_CATEGORY = {"person": 250, "animal": 250, "object": 700, "food": 200, "place": 250}
_NUM_VERBS, _NUM_ADJECTIVES, _NUM_NAMES, _NUM_TIMES = 500, 400, 300, 16
_NUMBERS = tuple(range(2, 10))
_ZIPF_EXPONENT = 1.1

_PHONOLOGY = {
    "xen": (("p", "t", "k", "b", "d", "g", "m", "n", "s", "l", "r", "w", "h", "f", "v", "sh", "th",
             "ch", "st", "pl", "tr", "br", "gr", "cl"),
            ("a", "e", "i", "o", "u", "ee", "oo", "ai", "ow"),
            ("", "", "", "n", "t", "s", "l", "r", "m", "k", "nd", "st", "ng")),
    "xde": (("p", "t", "k", "b", "d", "g", "m", "n", "s", "z", "l", "r", "w", "h", "f", "v", "sch",
             "kn", "pf", "gr", "br", "tr", "st", "fl"),
            ("a", "e", "i", "o", "u", "ei", "au", "ie", "ue", "oe"),
            ("", "", "n", "t", "s", "l", "r", "m", "ch", "ck", "nd", "ng", "rt", "tz", "lt")),
    "name": (("m", "n", "l", "r", "s", "t", "k", "d", "j", "v", "b"),
             ("a", "e", "i", "o", "u", "ia", "ei"), ("", "", "", "n", "r", "s", "l")),
}
# Regular sound changes from xen to xsc, applied in order to every word.
_SOUND_CHANGES = ((r"sh", "s"), (r"th", "d"), (r"ch", "k"), (r"ee", "ie"), (r"oo", "u"),
                  (r"ow", "ou"), (r"ai", "ei"), (r"w", "v"), (r"cl", "kl"), (r"ng\b", "nk"),
                  (r"(?<=[aeiou])p(?=[aeiou])", "f"), (r"a\b", "o"))


def sound_change(word: str) -> str:
    """xen word -> its xsc cognate."""
    for pattern, replacement in _SOUND_CHANGES:
        word = re.sub(pattern, replacement, word)
    return word


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


class _Zipf:
    """Samples ranks 0..n-1 with probability proportional to (rank + 1) ** -exponent."""

    def __init__(self, n: int, exponent: float = _ZIPF_EXPONENT):
        weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
        self.cdf = list(np.cumsum(weights / weights.sum()))
        self.cdf[-1] = 1.0

    def __call__(self, rng: np.random.Generator) -> int:
        return bisect.bisect_right(self.cdf, rng.random())


def _make_words(rng, phonology, lengths: Sequence[int], taken: set[str]) -> list[str]:
    """Unique words with the given syllable counts (frequent concepts get the short ones)."""
    onsets, vowels, codas = phonology
    words = []
    for syllables in lengths:
        for attempt in range(1000):
            n = syllables + attempt // 200  # lengthen when short forms run out
            word = "".join(
                (onsets[rng.integers(len(onsets))] if (s > 0 or rng.random() < 0.8) else "")
                + vowels[rng.integers(len(vowels))]
                + (codas[rng.integers(len(codas))] if s == n - 1 or rng.random() < 0.3 else "")
                for s in range(n))
            if word not in taken:
                break
        taken.add(word)
        words.append(word)
    return words


def _syllables_by_rank(n: int) -> list[int]:
    return [1 if r < 15 else 2 if r < 200 else 3 for r in range(n)]


@dataclasses.dataclass(frozen=True)
class _Concepts:
    noun_category: tuple[str, ...]
    noun_gender: tuple[int, ...]  # xde gender: 0 masculine, 1 feminine, 2 neuter
    nouns_by_category: dict
    verb_subject: tuple[tuple[str, ...], ...]
    verb_object: tuple[str | None, ...]  # None: intransitive
    adjective_categories: tuple[frozenset, ...]
    name_gender: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Lexicon:
    """One language's roots and function words."""

    nouns: tuple[str, ...]
    verbs: tuple[str, ...]
    adjectives: tuple[str, ...]
    times: tuple[str, ...]
    numbers: tuple[str, ...]
    function: dict  # role -> word (articles, pronouns, negation, adpositions, conjunction)

    def map(self, f) -> "Lexicon":
        return Lexicon(*(tuple(map(f, xs)) for xs in (self.nouns, self.verbs, self.adjectives,
                                                       self.times, self.numbers)),
                       {k: f(v) for k, v in self.function.items()})


_XEN_FUNCTION = ("def", "indef", "neg", "at", "in", "and", "he", "she", "it", "they")
_XDE_FUNCTION = ("def_nom_0", "def_nom_1", "def_nom_2", "def_acc_0", "def_acc_1", "def_acc_2",
                 "def_nom_pl", "def_acc_pl", "indef_nom_0", "indef_nom_1", "indef_nom_2",
                 "indef_acc_0", "indef_acc_1", "indef_acc_2", "neg", "in", "and",
                 "pro_0", "pro_1", "pro_2", "pro_pl")


@dataclasses.dataclass(frozen=True)
class Entity:
    kind: str  # 'name' | 'noun'
    concept: int
    plural: bool = False
    count: int | None = None  # index into _NUMBERS when plural with a number
    adjective: int | None = None


@dataclasses.dataclass(frozen=True)
class Fact:
    """One clause: `subject` and `object` index the document's entities."""

    subject: int
    verb: int
    object: int | None
    place: int | None  # a place noun concept
    time: int | None
    negated: bool
    past: bool

    @property
    def core(self) -> tuple:
        """What a summary keeps: the event without its scene."""
        return (self.subject, self.verb, self.object, self.negated, self.past)


@dataclasses.dataclass(frozen=True)
class Document:
    """A story's facts and its key facts (the summary), language-independent."""

    entities: tuple[Entity, ...]
    facts: tuple[Fact, ...]
    summary: tuple[Fact, ...]


class Corpus:
    """The synthetic world for one seed; every method is a pure function of its arguments."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._concepts, self._lexicons, self._names = _world(self.seed)
        self._noun_zipf = {c: _Zipf(len(v)) for c, v in self._concepts.nouns_by_category.items()}
        self._adj_zipf = _Zipf(_NUM_ADJECTIVES)
        self._name_zipf = _Zipf(_NUM_NAMES)
        self._time_zipf = _Zipf(_NUM_TIMES)
        self._verbs_by_subject = {
            c: [v for v in range(_NUM_VERBS) if c in self._concepts.verb_subject[v]]
            for c in ("person", "animal")}
        self._verb_zipf = {c: _Zipf(len(v)) for c, v in self._verbs_by_subject.items()}

    def lexicon(self, lang: str) -> Lexicon:
        _check_lang(lang)
        return self._lexicons[lang]

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    # -- the three kinds of data -----------------------------------------------------------
    def monolingual(self, split: str, index: int) -> tuple[str, str]:
        """(language, text) of pretraining document `index`: xen or xde, 2-8 sentences."""
        rng = self._example_rng(split, "monolingual", index)
        lang = PRETRAINING_LANGUAGES[int(rng.integers(len(PRETRAINING_LANGUAGES)))]
        doc = self._story(rng, num_facts=int(rng.integers(2, 9)))
        return lang, self.realise(doc.entities, doc.facts, lang)

    def bitext(self, split: str, index: int) -> str:
        """A pretraining document that is a passage in xen or xde followed by its translation
        ("passage = translation"), as web text sometimes is: what lets pretraining teach the
        lexicons' correspondence. Its stories are drawn apart from the translation task's."""
        rng = self._example_rng(split, "bitext", index)
        doc = self._story(rng, num_facts=int(rng.integers(1, 4)))
        pair = [self.realise(doc.entities, doc.facts, lang) for lang in PRETRAINING_LANGUAGES]
        if rng.random() < 0.5:
            pair.reverse()
        return " = ".join(pair)

    def parallel(self, split: str, index: int, src: str = "xen", tgt: str = "xde") -> tuple[str, str]:
        """A translation pair: the same one or two sentences in `src` and in `tgt`."""
        doc = self.parallel_document(split, index)
        return self.realise(doc.entities, doc.facts, src), self.realise(doc.entities, doc.facts, tgt)

    def parallel_document(self, split: str, index: int) -> Document:
        rng = self._example_rng(split, "parallel", index)
        return self._story(rng, num_facts=int(rng.integers(1, 3)))

    def summarization(self, split: str, index: int, lang: str = "xen",
                      summary_lang: str | None = None) -> tuple[str, str]:
        """(document, summary): a 4-8 sentence story and its protagonist's key facts."""
        doc = self.document(split, index)
        return (self.realise(doc.entities, doc.facts, lang),
                self.realise(doc.entities, doc.summary, summary_lang or lang))

    def document(self, split: str, index: int) -> Document:
        rng = self._example_rng(split, "summarization", index)
        return self._story(rng, num_facts=int(rng.integers(4, 9)))

    def iter_monolingual(self, split: str, start: int = 0) -> Iterator[tuple[str, str]]:
        """Streams monolingual documents start, start + 1, ... forever."""
        index = start
        while True:
            yield self.monolingual(split, index)
            index += 1

    # -- semantics -------------------------------------------------------------------------
    def _example_rng(self, split: str, kind: str, index: int) -> np.random.Generator:
        if split not in SPLITS:
            raise ValueError(f"corpus split {split!r} is not one of {SPLITS}")
        if index < 0:
            raise ValueError(f"corpus index must be non-negative, got {index}")
        return _rng(self.seed, SPLITS.index(split), _KINDS[kind], int(index))

    def _noun_entity(self, rng, category: str) -> Entity:
        nouns = self._concepts.nouns_by_category[category]
        concept = nouns[self._noun_zipf[category](rng)]
        plural = category != "place" and rng.random() < 0.25
        count = int(rng.integers(len(_NUMBERS))) if plural and rng.random() < 0.5 else None
        adjective = None
        if rng.random() < 0.35:
            for _ in range(4):  # adjectives fit some categories only
                a = self._adj_zipf(rng)
                if category in self._concepts.adjective_categories[a]:
                    adjective = a
                    break
        return Entity("noun", concept, plural, count, adjective)

    def _story(self, rng, num_facts: int) -> Document:
        c = self._concepts
        if rng.random() < 0.7:
            protagonist = Entity("name", self._name_zipf(rng))
        else:
            protagonist = self._noun_entity(rng, "person")
        entities = [protagonist]
        scene_place = c.nouns_by_category["place"][self._noun_zipf["place"](rng)]
        scene_time = self._time_zipf(rng) if rng.random() < 0.6 else None
        past = rng.random() < 0.7
        facts = []
        for k in range(num_facts):
            agents = [i for i, e in enumerate(entities) if self._category(e) in self._verbs_by_subject]
            subject = 0 if (k == 0 or rng.random() < 0.6 or len(agents) == 1) else \
                agents[int(rng.integers(1, len(agents)))]
            subject_category = self._category(entities[subject])
            verb = self._verbs_by_subject[subject_category][self._verb_zipf[subject_category](rng)]
            obj = None
            object_category = c.verb_object[verb]
            if object_category is not None:
                candidates = [i for i, e in enumerate(entities)
                              if i != subject and self._category(e) == object_category]
                if candidates and rng.random() < 0.5:
                    obj = candidates[int(rng.integers(len(candidates)))]
                else:
                    if object_category == "person" and rng.random() < 0.5:
                        entities.append(Entity("name", self._name_zipf(rng)))
                    else:
                        entities.append(self._noun_entity(rng, object_category))
                    obj = len(entities) - 1
            place = scene_place if (k == 0 or rng.random() < 0.25) else None
            time = scene_time if k == 0 else None
            facts.append(Fact(subject, verb, obj, place, time, bool(rng.random() < 0.1), past))
        key = [dataclasses.replace(f, place=None, time=None)
               for f in facts if f.subject == 0 and not f.negated][:3]
        summary = tuple(key[:max(1, len(facts) - 1)]) or (dataclasses.replace(facts[0], place=None, time=None),)
        return Document(tuple(entities), tuple(facts), summary)

    def _category(self, entity: Entity) -> str:
        return "person" if entity.kind == "name" else self._concepts.noun_category[entity.concept]

    def _gender(self, entity: Entity) -> int:
        if entity.kind == "name":
            return self._concepts.name_gender[entity.concept]
        return self._concepts.noun_gender[entity.concept]

    # -- surface realisation ---------------------------------------------------------------
    def realise(self, entities: Sequence[Entity], facts: Sequence[Fact], lang: str) -> str:
        """The facts as text in `lang`, with in-text reference (articles, pronouns)."""
        _check_lang(lang)
        lex = self._lexicons[lang]
        mentioned: set[int] = set()
        previous_subject = None
        sentences = []
        for fact in facts:
            pronoun = fact.subject == previous_subject
            words = (self._xde_clause if lang == "xde" else self._xen_clause)(
                lex, entities, fact, mentioned, pronoun)
            previous_subject = fact.subject
            sentences.append(" ".join(words) + ".")
        return " ".join(sentences)

    def _xen_clause(self, lex, entities, fact, mentioned, pronoun) -> list[str]:
        f = lex.function
        subject = entities[fact.subject]
        if pronoun:
            words = [f["they"] if subject.plural else
                     (f["he"], f["she"], f["it"])[self._xen_pronoun(subject)]]
        else:
            words = self._xen_np(lex, subject, fact.subject in mentioned)
        mentioned.add(fact.subject)
        if fact.negated:
            words.append(f["neg"])
        verb = lex.verbs[fact.verb]
        words.append(verb + "ed" if fact.past else verb if subject.plural else verb + "s")
        if fact.object is not None:
            words += self._xen_np(lex, entities[fact.object], fact.object in mentioned)
            mentioned.add(fact.object)
        if fact.place is not None:
            words += [f["in"], f["def"], lex.nouns[fact.place]]
        if fact.time is not None:
            words += [f["at"], lex.times[fact.time]]
        return words

    def _xen_pronoun(self, entity: Entity) -> int:
        if self._category(entity) != "person":
            return 2
        return 0 if self._gender(entity) == 0 else 1

    def _xen_np(self, lex, entity: Entity, definite: bool) -> list[str]:
        if entity.kind == "name":
            return [self._names[entity.concept]]
        words = [lex.function["def"]] if definite else [] if entity.plural else [lex.function["indef"]]
        if entity.count is not None:
            words.append(lex.numbers[entity.count])
        if entity.adjective is not None:
            words.append(lex.adjectives[entity.adjective])
        words.append(lex.nouns[entity.concept] + ("s" if entity.plural else ""))
        return words

    def _xde_clause(self, lex, entities, fact, mentioned, pronoun) -> list[str]:
        f = lex.function
        subject = entities[fact.subject]
        words = [lex.times[fact.time]] if fact.time is not None else []
        if pronoun:
            words.append(f["pro_pl"] if subject.plural else f[f"pro_{self._gender(subject)}"])
        else:
            words += self._xde_np(lex, subject, fact.subject in mentioned, "nom")
        mentioned.add(fact.subject)
        if fact.object is not None:
            words += self._xde_np(lex, entities[fact.object], fact.object in mentioned, "acc")
            mentioned.add(fact.object)
        if fact.place is not None:
            place = Entity("noun", fact.place)
            words += self._xde_np(lex, place, True, "acc") + [f["in"]]
        if fact.negated:
            words.append(f["neg"])
        suffix = ("te" if fact.past else "t") if not subject.plural else ("ten" if fact.past else "en")
        words.append(lex.verbs[fact.verb] + suffix)
        return words

    def _xde_np(self, lex, entity: Entity, definite: bool, case: str) -> list[str]:
        if entity.kind == "name":
            return [self._names[entity.concept]]
        gender = self._gender(entity)
        f = lex.function
        if entity.plural:
            words = [f[f"def_{case}_pl"]] if definite else []
        else:
            words = [f[f"{'def' if definite else 'indef'}_{case}_{gender}"]]
        if entity.count is not None:
            words.append(lex.numbers[entity.count])
        noun = lex.nouns[entity.concept]
        words.append(noun + ("e", "en", "er")[gender] if entity.plural else noun)
        if entity.adjective is not None:
            agreement = "en" if entity.plural else ("er", "e", "es")[gender]
            words.append(lex.adjectives[entity.adjective] + agreement)
        return words


def _check_lang(lang: str):
    if lang not in LANGUAGES:
        raise ValueError(f"language {lang!r} is not one of {LANGUAGES}")


@functools.lru_cache(maxsize=4)
def _world(seed: int):
    rng = _rng(seed, 0)
    noun_category, nouns_by_category = [], {}
    for category in _CATEGORIES:
        start = len(noun_category)
        noun_category += [category] * _NOUNS_PER_CATEGORY[category]
        nouns_by_category[category] = tuple(range(start, len(noun_category)))
    noun_gender = tuple(int(g) for g in rng.integers(3, size=len(noun_category)))
    verb_subject, verb_object = [], []
    for _ in range(_NUM_VERBS):
        verb_subject.append(("person",) if rng.random() < 0.6 else ("person", "animal"))
        verb_object.append(None if rng.random() < 0.3 else
                           ("object", "food", "animal", "person", "object")[rng.integers(5)])
    adjective_categories = tuple(
        frozenset(rng.choice(_CATEGORIES, size=int(rng.integers(1, 4)), replace=False).tolist())
        for _ in range(_NUM_ADJECTIVES))
    concepts = _Concepts(tuple(noun_category), noun_gender, nouns_by_category, tuple(verb_subject),
                         tuple(verb_object), adjective_categories,
                         tuple(int(g) for g in rng.integers(2, size=_NUM_NAMES)))

    def lexicon(lang, function_roles):
        taken: set[str] = set()
        phonology = _PHONOLOGY[lang]
        # Function words first so that they get the shortest forms.
        function = dict(zip(function_roles, _make_words(rng, phonology, [1] * len(function_roles), taken)))
        nouns = []
        for category in _CATEGORIES:  # Zipf rank is the rank within the category
            nouns += _make_words(rng, phonology, _syllables_by_rank(_NOUNS_PER_CATEGORY[category]), taken)
        return Lexicon(
            nouns=tuple(nouns),
            verbs=tuple(_make_words(rng, phonology, _syllables_by_rank(_NUM_VERBS), taken)),
            adjectives=tuple(_make_words(rng, phonology, _syllables_by_rank(_NUM_ADJECTIVES), taken)),
            times=tuple(_make_words(rng, phonology, [2] * _NUM_TIMES, taken)),
            numbers=tuple(_make_words(rng, phonology, [1] * len(_NUMBERS), taken)),
            function=function)

    xen = lexicon("xen", _XEN_FUNCTION)
    xde = lexicon("xde", _XDE_FUNCTION)
    names = tuple(w.capitalize() for w in _make_words(rng, _PHONOLOGY["name"], [2] * _NUM_NAMES, set()))
    return concepts, {"xen": xen, "xde": xde, "xsc": xen.map(sound_change)}, names
