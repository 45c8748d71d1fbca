"""Varied chat prompts for self-distillation: topics x task templates, shuffled with a seed.

No dataset is reachable from here, so the prompts are made: about 120 topics from everyday
life, science, code, history and writing, each under ~30 kinds of request (explain, list,
compare, write code, rewrite, answer briefly...). The target's own greedy answers to them are
what the heads learn to predict, so the prompts only need to make it talk in the ways users
make it talk.
"""

from __future__ import annotations

import random

TOPICS = """
photosynthesis; the water cycle; black holes; the French Revolution; the Roman Empire;
machine learning; neural networks; climate change; volcanoes; earthquakes; the immune system;
vaccines; the human heart; sleep; healthy breakfast ideas; learning a new language;
saving money; starting a small business; job interviews; writing a resume; public speaking;
time management; meditation; running a marathon; growing tomatoes; keeping houseplants alive;
baking bread; making pasta from scratch; coffee brewing; the history of tea; chess openings;
the rules of football; the Olympic Games; jazz music; the piano; painting with watercolors;
photography basics; the Renaissance; Shakespeare; poetry; science fiction novels; the Moon landing;
Mars exploration; the solar system; electric cars; solar panels; wind energy; recycling;
the ocean; coral reefs; whales; dogs as pets; cats; birds migration; bees and pollination;
dinosaurs; evolution; DNA; the periodic table; chemical reactions; gravity; electricity;
magnets; the speed of light; quantum computing; the internet; how email works; passwords and
security; Python lists; Python dictionaries; sorting algorithms; binary search; recursion;
SQL joins; HTTP requests; JSON files; Git branches; unit testing; the Linux command line;
JavaScript promises; CSS layouts; regular expressions; linked lists; hash tables;
prime numbers; fractions; the Pythagorean theorem; probability; statistics; compound interest;
inflation; supply and demand; democracy; the United Nations; world geography; the Amazon
rainforest; deserts; mountains; rivers of Europe; Japan; Italy; Egypt; Brazil; Canada;
traveling on a budget; packing for a trip; camping; first aid; cooking rice; vegetarian meals;
the history of writing; libraries; museums; friendship; writing a thank-you note; birthdays;
moving to a new city; remote work; video games; board games; social media; smartphones
""".replace("\n", " ")

TEMPLATES = [
    "Explain {t} in simple terms.",
    "What is the most important thing to know about {t}?",
    "Give me three interesting facts about {t}.",
    "Write a short paragraph about {t}.",
    "Can you list five key points about {t}?",
    "How would you explain {t} to a ten-year-old?",
    "Write a short poem about {t}.",
    "What are common misconceptions about {t}?",
    "Summarize {t} in two sentences.",
    "What are the pros and cons of {t}?",
    "Give me a step-by-step guide related to {t}.",
    "Write a short story that involves {t}.",
    "What questions should a beginner ask about {t}?",
    "Tell me about the history of {t}.",
    "Why does {t} matter?",
    "Write a tweet about {t}.",
    "Describe {t} in one paragraph for a school report.",
    "What is a good way to learn about {t}?",
    "Compare {t} and {u}.",
    "How are {t} and {u} related?",
    "Write an email to a friend about {t}.",
    "Give me a quiz with three questions about {t}.",
    "What would happen if there were no {t}?",
    "Write a Python function related to {t}.",
    "Define {t}.",
    "Tell me a fun fact about {t}.",
    "I want to know more about {t}. Where should I start?",
    "Write a short dialogue between two people discussing {t}.",
    "What are three tips for {t}?",
    "Rewrite this sentence more formally: I think {t} is really cool and everyone should know it.",
]

QUESTIONS = [
    "What is the capital of France?",
    "What is 12 times 7?",
    "Who wrote Romeo and Juliet?",
    "How many days are in a leap year?",
    "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.",
    "What is the largest planet in the solar system?",
    "Write a haiku about autumn.",
    "Hello! How are you today?",
    "Can you help me plan my week?",
]


def topics() -> list[str]:
    return [t.strip() for t in TOPICS.split(";") if t.strip()]


def make_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts (topics x templates, plus a few plain questions), shuffled."""
    rng = random.Random(seed)
    names = topics()
    out = list(QUESTIONS)
    pool = [(tpl, t) for tpl in TEMPLATES for t in names]
    rng.shuffle(pool)
    for tpl, t in pool:
        u = rng.choice([n for n in names if n != t])
        out.append(tpl.format(t=t, u=u))
    rng.shuffle(out)
    return out[:count]
