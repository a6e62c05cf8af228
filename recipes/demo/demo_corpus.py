"""Seeded generator of the demo's English corpus: stories, instructions and quiz questions.

The demo (`make demo`) must prune a model that has real quality to lose, on a machine with no network and
no GPU, and nothing third-party may be embedded. So the project writes its own small world: a few dozen
names, animals, colours, objects and places, a story grammar over them, and tasks whose answers follow
from the text (a fact stated in the story, a sum of small numbers, a word in capitals). A model of about
a million parameters learns this world in minutes on a CPU, and pruning then measurably hurts perplexity
and quiz accuracy, which fine-tuning can win back.

Every function takes a `random.Random` or a seed, so the same seed gives byte-identical files; the demo's
train, dev and eval files use different seeds, so the dev text and the quiz stories are held out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

NAMES: dict[str, str] = {  # name -> possessive pronoun
    "Lily": "her", "Tom": "his", "Mia": "her", "Ben": "his", "Anna": "her", "Max": "his", "Lucy": "her",
    "Jack": "his", "Emma": "her", "Leo": "his", "Zoe": "her", "Sam": "his", "Amy": "her", "Dan": "his",
    "Ella": "her", "Finn": "his",
}
SOUNDS: dict[str, str] = {
    "cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
    "owl": "hoot", "lion": "roar", "frog": "croak", "horse": "neigh", "bird": "tweet", "mouse": "squeak",
}
ANIMALS = list(SOUNDS)
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "black", "brown"]
OBJECTS = ["ball", "kite", "hat", "box", "cup", "book", "drum", "boat", "apple", "flower", "shoe", "key",
           "bell", "blanket", "car"]
PLACES = ["park", "garden", "forest", "beach", "farm", "river", "hill", "town", "lake", "school"]
HIDING_SPOTS = ["tree", "bed", "rock", "table", "bench", "bush", "chair", "bridge"]
FEELINGS = ["sad", "scared", "worried", "upset"]
GAMES = ["played tag", "ran in circles", "jumped in the leaves", "sang a song", "built a tower",
         "danced in the sun", "looked at the clouds", "counted the birds"]
WEATHER = ["The sun was warm.", "The wind was soft.", "The sky was blue.", "It was a bright day.",
           "There were big white clouds."]
SIZES = ["little", "small", "big", "happy", "kind", "brave", "shy", "funny"]
OPPOSITES: dict[str, str] = {
    "big": "small", "small": "big", "hot": "cold", "cold": "hot", "happy": "sad", "sad": "happy",
    "fast": "slow", "slow": "fast", "up": "down", "down": "up", "day": "night", "night": "day",
    "wet": "dry", "dry": "wet", "old": "new", "new": "old", "open": "closed", "closed": "open",
    "light": "dark", "dark": "light", "tall": "short", "short": "tall", "loud": "quiet", "quiet": "loud",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
PLURALS: dict[str, str] = {**{w: w + "s" for w in ANIMALS + OBJECTS}, "mouse": "mice", "sheep": "sheep",
                           "box": "boxes", "bus": "buses", "fox": "foxes", "child": "children"}

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_alpaca(row: dict[str, str]) -> str:
    """The standard Alpaca prompt followed by the response, so the source model already knows the
    template that the pruning and fine-tuning data use."""
    template = ALPACA_WITH_INPUT if row["input"] else ALPACA_NO_INPUT
    return template.format(instruction=row["instruction"], input=row["input"]) + row["output"]


def render_question(question: str, answer: str) -> str:
    """The `Question: ...\\nAnswer: ...` layout that multiple-choice evaluation scores continuations in."""
    return f"Question: {question}\nAnswer: {answer}"


@dataclass(frozen=True)
class Facts:
    """The slots one story was written from; questions are asked about them."""

    name: str
    animal: str
    trait: str
    color: str
    obj: str
    place: str
    friend: str
    feeling: str
    spot: str
    game: str

    @property
    def pronoun(self) -> str:
        return NAMES[self.name]


def draw_facts(rng: random.Random) -> Facts:
    name, friend = rng.sample(sorted(NAMES), 2)
    return Facts(name=name, animal=rng.choice(ANIMALS), trait=rng.choice(SIZES), color=rng.choice(COLORS),
                 obj=rng.choice(OBJECTS), place=rng.choice(PLACES), friend=friend,
                 feeling=rng.choice(FEELINGS), spot=rng.choice(HIDING_SPOTS), game=rng.choice(GAMES))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def long_story(f: Facts, rng: random.Random) -> list[str]:
    """A story of about ten sentences, returned as sentences so a task can split it."""
    opening = rng.choice([
        f"Once upon a time, there was {article(f.trait)} {f.trait} {f.animal} named {f.name}.",
        f"One day, {article(f.trait)} {f.trait} {f.animal} named {f.name} woke up early.",
    ])
    return [
        opening,
        f"{f.name} had {article(f.color)} {f.color} {f.obj}.",
        f"{f.name} loved the {f.obj} very much.",
        f"{f.name} took the {f.obj} to the {f.place} with {f.pronoun} friend {f.friend}.",
        rng.choice(WEATHER),
        f"{f.name} and {f.friend} {f.game}.",
        f"Then {f.name} could not find the {f.obj}.",
        f"{f.name} felt {f.feeling}.",
        f"{f.friend} said, \"Do not be {f.feeling}. I will help you.\"",
        f"They looked everywhere, and they found the {f.obj} under the {f.spot}.",
        rng.choice([f"{f.name} was happy again.", f"{f.name} hugged {f.friend}."]),
        rng.choice(["The end.", f"From that day on, {f.name} kept the {f.obj} close."]),
    ]


def short_story(f: Facts) -> str:
    """Four sentences that state every fact a question can ask about; short enough for 128 tokens."""
    return (f"{f.name} is {article(f.trait)} {f.trait} {f.animal}. {f.name} has {article(f.color)} {f.color} {f.obj}. "
            f"{f.name} went to the {f.place} with {f.friend}. The {f.obj} was under the {f.spot}.")


# (question, short answer, full-sentence answer, the pool the wrong choices come from)
Question = tuple[str, str, str, list[str]]


def story_questions(f: Facts) -> list[Question]:
    return [
        (f"What color is the {f.obj}?", f.color, f"The {f.obj} is {f.color}.", COLORS),
        (f"What does {f.name} have?", f.obj, f"{f.name} has {article(f.color)} {f.color} {f.obj}.", OBJECTS),
        (f"Where did {f.name} go?", f"the {f.place}", f"{f.name} went to the {f.place}.",
         [f"the {p}" for p in PLACES]),
        (f"Who went with {f.name}?", f.friend, f"{f.friend} went with {f.name}.", sorted(NAMES)),
        (f"What kind of animal is {f.name}?", f.animal, f"{f.name} is {article(f.animal)} {f.animal}.", ANIMALS),
        (f"Where was the {f.obj}?", f"under the {f.spot}", f"The {f.obj} was under the {f.spot}.",
         [f"under the {s}" for s in HIDING_SPOTS]),
    ]


def fact_question(rng: random.Random) -> Question:
    """A question answered by general facts of this small world rather than by a story."""
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(11), rng.randrange(11)
        return (f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b],
                f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.", NUMBERS)
    if kind == 1:
        a = rng.randrange(1, 11)
        b = rng.randrange(a + 1)
        return (f"What is {NUMBERS[a]} minus {NUMBERS[b]}?", NUMBERS[a - b],
                f"{NUMBERS[a].capitalize()} minus {NUMBERS[b]} is {NUMBERS[a - b]}.", NUMBERS[:11])
    if kind == 2:
        word = rng.choice(sorted(OPPOSITES))
        return (f"What is the opposite of {word}?", OPPOSITES[word],
                f"The opposite of {word} is {OPPOSITES[word]}.", sorted(set(OPPOSITES.values()) - {word}))
    if kind == 3:
        animal = rng.choice(ANIMALS)
        return (f"What does {article(animal)} {animal} say?", SOUNDS[animal],
                f"{article(animal).capitalize()} {animal} says {SOUNDS[animal]}.", sorted(SOUNDS.values()))
    n = rng.randrange(20)
    return (f"What number comes after {NUMBERS[n]}?", NUMBERS[n + 1],
            f"After {NUMBERS[n]} comes {NUMBERS[n + 1]}.", NUMBERS)


def _continue_story(rng: random.Random) -> dict[str, str]:
    sentences = long_story(draw_facts(rng), rng)
    cut = rng.randrange(3, 7)
    return {"instruction": "Continue the story.", "input": " ".join(sentences[:cut]),
            "output": " ".join(sentences[cut:])}


def _write_story(rng: random.Random) -> dict[str, str]:
    f = draw_facts(rng)
    return {"instruction": f"Write a short story about {article(f.animal)} {f.animal} named {f.name} "
                           f"who has {article(f.color)} {f.color} {f.obj}.",
            "input": "", "output": " ".join(long_story(f, rng))}


def _story_question(rng: random.Random) -> dict[str, str]:
    f = draw_facts(rng)
    question, _, sentence, _ = rng.choice(story_questions(f))
    return {"instruction": "Read the story and answer the question.",
            "input": f"{short_story(f)}\nQuestion: {question}", "output": sentence}


def _fact(rng: random.Random) -> dict[str, str]:
    question, _, sentence, _ = fact_question(rng)
    return {"instruction": question, "input": "", "output": sentence}


def _sort_numbers(rng: random.Random) -> dict[str, str]:
    values = rng.sample(range(1, 21), rng.randrange(3, 6))
    return {"instruction": "Sort the numbers from smallest to largest.",
            "input": ", ".join(map(str, values)), "output": ", ".join(map(str, sorted(values)))}


def _capitals(rng: random.Random) -> dict[str, str]:
    words = rng.sample(ANIMALS + OBJECTS + COLORS, rng.randrange(1, 4))
    return {"instruction": "Write the words in capital letters.",
            "input": " ".join(words), "output": " ".join(w.upper() for w in words)}


def _plural(rng: random.Random) -> dict[str, str]:
    word = rng.choice(sorted(PLURALS))
    return {"instruction": "Write the plural of the word.", "input": word, "output": PLURALS[word]}


def _count_words(rng: random.Random) -> dict[str, str]:
    words = rng.sample(ANIMALS + OBJECTS, rng.randrange(1, 8))
    answer = "There is one word." if len(words) == 1 else f"There are {NUMBERS[len(words)]} words."
    return {"instruction": "How many words are in the list?", "input": ", ".join(words), "output": answer}


# Task makers with their share of the rows; story tasks dominate because they carry most of the language.
TASKS: list[tuple[Callable[[random.Random], dict[str, str]], int]] = [
    (_continue_story, 3), (_write_story, 1), (_story_question, 4), (_fact, 3),
    (_sort_numbers, 1), (_capitals, 1), (_plural, 1), (_count_words, 1),
]


def instruction_row(rng: random.Random) -> dict[str, str]:
    """One Alpaca row {instruction, input, output}."""
    makers, weights = zip(*TASKS)
    return rng.choices(makers, weights=weights)[0](rng)


def instruction_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [instruction_row(rng) for _ in range(n)]


def plain_document(rng: random.Random) -> str:
    """One document of the language-model corpus: a story, a quiz in Question/Answer layout, or an
    instruction row in the Alpaca template. Quizzes about a story get the largest share: answering them
    needs looking facts up in the context, the skill that takes a small model longest to learn."""
    kind = rng.choices(range(4), weights=[2, 4, 2, 2])[0]
    if kind == 0:
        return " ".join(long_story(draw_facts(rng), rng))
    if kind == 1:
        f = draw_facts(rng)
        if rng.random() < 0.5:  # the layout multiple-choice rows use: the story inside the question
            question, answer, _, _ = rng.choice(story_questions(f))
            return render_question(f"{short_story(f)} {question}", answer)
        asked = rng.sample(story_questions(f), 4)
        return "\n".join([short_story(f)] + [render_question(q, a) for q, a, _, _ in asked])
    if kind == 2:
        question, answer, _, _ = fact_question(rng)
        return render_question(question, answer)
    return render_alpaca(instruction_row(rng))


def documents(seed: int) -> Iterator[str]:
    """An endless, seeded stream of documents for training the source model."""
    rng = random.Random(seed)
    while True:
        yield plain_document(rng)


def dev_text(n_docs: int, seed: int) -> str:
    """Held-out plain text for perplexity: documents separated by blank lines."""
    rng = random.Random(seed)
    return "\n\n".join(plain_document(rng) for _ in range(n_docs)) + "\n"


def multiple_choice_row(rng: random.Random, n_choices: int = 4) -> dict[str, object]:
    """A quiz row {question, choices, answer}: two thirds ask about a fresh short story, one third ask a
    fact; the wrong choices come from the same category, so only knowing the answer beats chance."""
    if rng.random() < 2 / 3:
        f = draw_facts(rng)
        question, answer, _, pool = rng.choice(story_questions(f))
        question = f"{short_story(f)} {question}"
    else:
        question, answer, _, pool = fact_question(rng)
    wrong = rng.sample([c for c in pool if c != answer], n_choices - 1)
    choices = wrong + [answer]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def multiple_choice_rows(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [multiple_choice_row(rng) for _ in range(n)]
