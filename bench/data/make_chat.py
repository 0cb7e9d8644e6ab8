"""Writes the datasets of bench/training.py: chat conversations of realistic, varied length, composed from templates.

    .venv/bin/python bench/data/make_chat.py

- `chat.jsonl`: 48 conversations for the speed benchmark. User turns of 5 to 250 words (a quick question, a
  question with a few sentences of context, or pasted notes to summarize), assistant turns of 3 to 80 words (a
  short reply, a few sentences of advice, or numbered steps); a quarter open with a system message and a sixth
  have a second user turn and answer. Encoded with SmolLM2's chat template they are 45 to 383 tokens long (median
  153; 8,099 tokens, 1,999 of them loss-bearing).
- `chat_512.jsonl`: 48 conversations of 508 to 512 tokens each (pasted notes topped up sentence by sentence, and an
  answer of 60 to 80 words), the batch-48 memory job of `bench/training.py --memory-job`: the longest a default job
  (max_seq_length 512) trains on without cutting.
- `answers.jsonl`: 48 conversations of another shape, long answers: a short question (sometimes after a sentence of
  context), no system message, and an answer of 30 to 300 words (numbered advice, some steps with an example):
  most tokens carry the loss, so skipping the logits of the prompt saves little; padding is what is left to remove.
- `prompts.jsonl`: 48 conversations of a third shape, long prompts and short answers: every one opens with a system
  message, then pasted notes of 25 to 130 words and a question, and an answer of 2 to 25 words: few tokens carry
  the loss.

The sentences are composed from the vocabulary below (ten everyday domains: subjects, what happened to them,
tasks, advice), so the text reads like English without any download. Token counts come from the tokenizer of the
built-in `smollm2-135m-instruct` (converted once into the default data dir's model cache, as the benchmarks do).
The output is deterministic: running this again rewrites the same bytes.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEED = 20261129
N_EXAMPLES = 48
MAX_TOKENS_512 = 512
MIN_TOKENS_512 = 500
PROMPT_WORDS = (5, 250)
ANSWER_WORDS = (3, 80)
ANSWER_LONG_WORDS = (30, 300)  # answers.jsonl
PROMPT_NOTES_WORDS = (25, 130)  # prompts.jsonl

DOMAINS: dict[str, dict[str, list[str]]] = {
    "kitchen": {
        "subjects": [
            "the sourdough starter",
            "my cast iron pan",
            "the tomato sauce",
            "the oven",
            "the rice cooker",
            "the chicken stock",
            "the pie crust",
            "my knife set",
        ],
        "predicates": [
            "smelled sour after two days on the counter",
            "stuck to the bottom even with plenty of oil",
            "took almost an hour longer than the recipe said",
            "came out pale and a little soggy in the middle",
            "burned on one side while the other stayed raw",
            "tasted flat until I added more salt",
            "needs to feed eight people on Saturday",
            "has been fine for years without any special care",
            "was too thick to pour once it cooled down",
            "started to rust near the handle",
        ],
        "tasks": [
            "keep bread fresh for a week",
            "season a new pan",
            "thicken a soup without flour",
            "cook rice that is not sticky",
            "plan meals for a busy week",
            "store fresh herbs",
        ],
        "advice": [
            "Keep the heat at medium and let the pan warm up for a few minutes before anything goes in.",
            "Taste as you go and add salt in small pinches rather than all at the end.",
            "Rinse the rice until the water runs clear, then let it rest covered for ten minutes.",
            "Wrap the loaf in a cloth and keep it in a paper bag, not in the fridge.",
            "A spoonful of mashed potato or a handful of oats will thicken a soup quietly.",
            "Dry the pan on the stove after washing and rub in a thin layer of oil.",
            "Cook a big pot of beans or grains on Sunday and build the week's meals around it.",
            "Put soft herbs in a glass of water like flowers and cover them loosely.",
        ],
        "short": ["Use less water.", "Lower the heat.", "Yes, freeze it.", "Add a pinch of salt."],
    },
    "garden": {
        "subjects": [
            "the lemon tree",
            "our vegetable bed",
            "the lawn",
            "the tomato plants",
            "the compost heap",
            "the climbing roses",
            "the basil on the balcony",
            "the old apple tree",
        ],
        "predicates": [
            "has yellow leaves with brown spots",
            "stopped growing in the middle of summer",
            "gets full sun only in the afternoon",
            "was planted last spring in heavy clay soil",
            "is covered in small white insects",
            "smells bad after the rain",
            "produced lots of flowers but almost no fruit",
            "dries out within a day when it is hot",
            "has not been pruned for several years",
            "looks healthy except for a few curled leaves",
        ],
        "tasks": [
            "get rid of aphids without chemicals",
            "improve clay soil",
            "water plants while on holiday",
            "prune a fruit tree",
            "start seeds indoors",
            "make compost faster",
        ],
        "advice": [
            "Water deeply once or twice a week instead of a little every day, early in the morning.",
            "Mix a few centimetres of compost into the top of the bed every autumn.",
            "Spray the aphids off with a hose and encourage ladybirds by leaving some weeds.",
            "Prune in late winter, removing crossing branches and opening the centre to light.",
            "Turn the heap every couple of weeks and keep it as damp as a wrung-out sponge.",
            "Move the pot to a spot with morning sun and shelter it from the afternoon heat.",
            "Feed it with a balanced fertiliser once a month during the growing season.",
            "Mulch around the base to keep the soil cool and moist.",
        ],
        "short": ["Water it less.", "Prune in winter.", "Try neem oil.", "It needs more sun."],
    },
    "software": {
        "subjects": [
            "the build server",
            "our payment service",
            "the login page",
            "the nightly backup",
            "the database migration",
            "the mobile app",
            "the search index",
            "the test suite",
        ],
        "predicates": [
            "failed twice last night with a timeout",
            "takes about forty seconds to start",
            "uses far more memory than it did last month",
            "returns an error for a few users in Europe",
            "passed on my laptop but not in the pipeline",
            "slowed down after the last release",
            "needs a review before the release on Friday",
            "has been running without problems since March",
            "logs a warning about a deprecated setting",
            "retries the same request several times in a row",
        ],
        "tasks": [
            "find a memory leak in a web service",
            "speed up a slow test suite",
            "roll back a bad release safely",
            "write a good bug report",
            "reduce the size of a container image",
            "make a flaky test reliable",
        ],
        "advice": [
            "Reproduce the problem with the smallest input you can find before changing any code.",
            "Compare the logs of a good run and a bad run side by side, starting from the first difference.",
            "Add a metric for the thing you suspect and watch it for a day before you decide.",
            "Run the slowest tests in parallel and share the expensive set-up between them.",
            "Keep the previous release deployable so that a rollback is one command.",
            "Pin the versions of your dependencies and update them on purpose, one at a time.",
            "Use a multi-stage build and copy only the compiled output into the final image.",
            "Replace sleeps in tests with waits for the condition you actually need.",
        ],
        "short": ["Check the logs first.", "Roll it back.", "Pin the version.", "Yes, that is a leak."],
    },
    "travel": {
        "subjects": [
            "our flight to Lisbon",
            "the train pass",
            "the hotel near the station",
            "my passport",
            "the rental car",
            "the hiking trip in the Alps",
            "our luggage",
            "the night bus",
        ],
        "predicates": [
            "was delayed by three hours without any explanation",
            "costs twice as much in August as in May",
            "expires in four months",
            "has no reviews newer than last year",
            "needs to be booked at least two weeks ahead",
            "leaves very early in the morning",
            "arrived with a broken wheel",
            "looked much bigger in the pictures",
            "includes breakfast but not the city tax",
            "can be cancelled for free until Thursday",
        ],
        "tasks": [
            "pack light for two weeks",
            "get over jet lag quickly",
            "find cheap flights",
            "travel with a small child",
            "stay safe hiking alone",
            "plan a weekend in a new city",
        ],
        "advice": [
            "Pack clothes that all go together and plan to wash a few things halfway through.",
            "Get outside in daylight on the first morning and go to bed at the local time.",
            "Set a price alert and stay flexible by a day or two on either side.",
            "Book the first and last nights and leave the middle of the trip open.",
            "Tell someone your route and the time you expect to be back.",
            "Keep a copy of your documents on your phone and another on paper.",
            "Pick one neighbourhood, walk it slowly and eat where the locals queue.",
            "Carry snacks, a change of clothes and one favourite toy in the hand luggage.",
        ],
        "short": ["Book it now.", "Take the train.", "Yes, renew it.", "Ask for a refund."],
    },
    "money": {
        "subjects": [
            "my savings account",
            "the credit card bill",
            "our monthly budget",
            "the car loan",
            "my pension plan",
            "the electricity contract",
            "the emergency fund",
            "our rent",
        ],
        "predicates": [
            "pays almost no interest at the moment",
            "was higher than usual this month",
            "never seems to last until the end of the month",
            "still has three years to run",
            "has not been checked since I changed jobs",
            "renews automatically at a higher price",
            "covers about two months of expenses",
            "went up by eight percent this year",
            "includes a fee I do not understand",
            "is paid on the first of every month",
        ],
        "tasks": [
            "build an emergency fund",
            "pay off a credit card faster",
            "start a simple budget",
            "save for a house",
            "cut monthly bills",
            "choose between saving and investing",
        ],
        "advice": [
            "Write down every expense for one month before you decide where to cut.",
            "Pay the debt with the highest interest first and the minimum on the rest.",
            "Move a fixed amount to savings on payday, before you spend anything else.",
            "Call the provider and ask for their current offer for new customers.",
            "Keep three to six months of expenses somewhere you can reach in a day.",
            "Invest only money you will not need for at least five years.",
            "Cancel subscriptions you have not used in the last month.",
            "Check the statement line by line and ask the bank about anything unclear.",
        ],
        "short": ["Pay it off first.", "Switch providers.", "Save it.", "Yes, that is normal."],
    },
    "fitness": {
        "subjects": [
            "my left knee",
            "the running plan",
            "my lower back",
            "the morning workout",
            "my sleep",
            "the swimming lessons",
            "my step count",
            "the new bike",
        ],
        "predicates": [
            "hurts after long runs downhill",
            "feels too easy after the first month",
            "gets stiff when I sit at the desk all day",
            "takes forty minutes and leaves me tired",
            "has been poor since I started training at night",
            "are twice a week at lunchtime",
            "dropped to about three thousand a day",
            "is set up too low for my height",
            "improved a lot once I added rest days",
            "felt fine until I doubled the distance",
        ],
        "tasks": [
            "start running without getting injured",
            "build a habit of exercising",
            "stretch after sitting all day",
            "train for a first ten kilometre race",
            "sleep better after evening workouts",
            "get stronger at home without equipment",
        ],
        "advice": [
            "Increase your weekly distance by no more than a tenth at a time.",
            "Walk for five minutes every hour and stand up for phone calls.",
            "Warm up slowly and keep most of your runs at an easy, chatty pace.",
            "Finish hard sessions at least three hours before you go to bed.",
            "Do squats, push-ups and planks three times a week and add repetitions slowly.",
            "See a physiotherapist if the pain lasts more than a week.",
            "Put your shoes by the door the night before and decide the time in advance.",
            "Raise the saddle so your leg is almost straight at the bottom of the pedal stroke.",
        ],
        "short": ["Rest for a week.", "Slow down.", "Raise the saddle.", "Yes, stretch daily."],
    },
    "home": {
        "subjects": [
            "the bathroom fan",
            "the kitchen tap",
            "our heating",
            "the front door",
            "the washing machine",
            "the bedroom window",
            "the wooden floor",
            "the fridge",
        ],
        "predicates": [
            "makes a loud rattling noise",
            "drips all night even when it is closed tightly",
            "takes ages to warm the living room",
            "sticks in wet weather",
            "leaves the clothes wet at the end of the cycle",
            "lets in a cold draught at the bottom",
            "has a few deep scratches near the sofa",
            "is louder than usual and the ice cream is soft",
            "was installed by the previous owner",
            "works fine in summer but not in winter",
        ],
        "tasks": [
            "fix a dripping tap",
            "bleed a radiator",
            "stop a door from sticking",
            "get rid of mould in the bathroom",
            "seal a drafty window",
            "clean a washing machine",
        ],
        "advice": [
            "Turn off the water under the sink before you take anything apart.",
            "Open the valve at the top with a radiator key until water starts to come out.",
            "Plane a little off the edge that rubs, then paint it so it does not swell again.",
            "Clean the patch with diluted vinegar and run the fan for twenty minutes after showers.",
            "Fit a foam strip around the frame and a brush strip along the bottom.",
            "Run an empty hot wash with a cup of soda crystals and clean the filter.",
            "Check the seal with a sheet of paper: if it slides out easily, replace the seal.",
            "Take a photo of every step so you can put it back together.",
        ],
        "short": ["Replace the washer.", "Call a plumber.", "Bleed the radiators.", "Clean the filter."],
    },
    "work": {
        "subjects": [
            "my manager",
            "the weekly meeting",
            "our team's project",
            "the quarterly report",
            "a new colleague",
            "my inbox",
            "the client",
            "the deadline",
        ],
        "predicates": [
            "asked for the figures by tomorrow morning",
            "runs over by half an hour every time",
            "is two weeks behind schedule",
            "has almost three hundred unread messages",
            "keeps changing the requirements",
            "seems overwhelmed and rarely asks questions",
            "was moved forward without anyone asking us",
            "went well apart from the budget section",
            "needs a decision before the end of the month",
            "is shared with two other departments",
        ],
        "tasks": [
            "say no to extra work politely",
            "run a shorter meeting",
            "prioritise when everything is urgent",
            "give feedback to a colleague",
            "ask for a raise",
            "write a clear status update",
        ],
        "advice": [
            "List everything on your plate and ask your manager to put it in order.",
            "Send the agenda a day ahead and end the meeting when the agenda is done.",
            "Start the update with the decision you need, then the facts behind it.",
            "Describe what you saw and its effect, then ask how they see it.",
            "Write down the scope you agreed and send it to the client after every call.",
            "Block two hours every morning for focused work and answer messages after that.",
            "Bring examples of your results and a number based on what similar roles pay.",
            "Offer to take the new task if something else can move to next month.",
        ],
        "short": ["Ask for more time.", "Cancel the meeting.", "Say no politely.", "Yes, escalate it."],
    },
    "study": {
        "subjects": [
            "the history exam",
            "my essay on climate policy",
            "the statistics course",
            "our group presentation",
            "the reading list",
            "my Spanish vocabulary",
            "the lab report",
            "the thesis outline",
        ],
        "predicates": [
            "is in ten days and I have not started",
            "is already two thousand words too long",
            "moves much faster than I expected",
            "has four people and nobody wants to lead",
            "has more books than I can read this term",
            "slips away a few days after I learn it",
            "is due on Monday and the data looks wrong",
            "was sent back with many comments",
            "covers the whole semester",
            "counts for half of the final grade",
        ],
        "tasks": [
            "remember vocabulary for longer",
            "plan revision for several exams",
            "cut an essay down to the word limit",
            "stay focused while studying",
            "read academic papers faster",
            "prepare a short presentation",
        ],
        "advice": [
            "Test yourself instead of rereading, and come back to the hard cards a few days later.",
            "Split the days before the exam between subjects and start with the one you fear most.",
            "Cut every sentence that repeats the point of the one before it.",
            "Study in blocks of twenty-five minutes with a short break and the phone in another room.",
            "Read the abstract, the figures and the conclusion first, then decide if you need the rest.",
            "Give each person one part of the talk and rehearse it together twice.",
            "Explain the idea out loud to someone else; the gaps show up at once.",
            "Ask the teacher which comments matter most and fix those first.",
        ],
        "short": ["Start today.", "Use flashcards.", "Cut the introduction.", "Yes, ask the teacher."],
    },
    "pets": {
        "subjects": [
            "our puppy",
            "the old cat",
            "my rabbit",
            "the goldfish",
            "our dog",
            "the parrot",
            "the kitten",
            "the guinea pigs",
        ],
        "predicates": [
            "chews the furniture when we leave the house",
            "stopped eating dry food last week",
            "hides under the bed when guests arrive",
            "pulls hard on the lead during walks",
            "scratches the sofa every evening",
            "barks at every noise in the night",
            "seems bored in the small cage",
            "drinks much more water than before",
            "sleeps most of the day",
            "gets along well with the children",
        ],
        "tasks": [
            "teach a dog to walk on a loose lead",
            "introduce a new cat to an old one",
            "keep a pet calm during fireworks",
            "choose food for an older cat",
            "leave a dog alone for a few hours",
            "trim a rabbit's nails",
        ],
        "advice": [
            "Stop walking whenever the lead goes tight and reward the dog when it comes back to you.",
            "Keep the new cat in one room for a week and swap their blankets so they learn each other's smell.",
            "Close the curtains, play some music and give the animal a quiet place to hide.",
            "Ask the vet to check the kidneys if an older cat drinks much more than usual.",
            "Leave a chew toy filled with food and practise short absences first.",
            "Put a scratching post right next to the sofa and praise every use.",
            "Give the cage more space and toys, and let them run in a safe room every day.",
            "Trim a little at a time, away from the pink part, with treats between paws.",
        ],
        "short": ["See a vet.", "Ignore the barking.", "Use a harness.", "Yes, that is normal."],
    },
}

CONNECTORS = ["and", "but", "because", "so", "although", "while", "after"]
SHORT_TEMPLATES = [
    "How to {task}?",
    "How do I {task}?",
    "What is the best way to {task}?",
    "Any tips to {task}?",
    "Can you tell me how to {task} quickly?",
    "Is there an easy way to {task} at home?",
]
QUESTION_ENDINGS = [
    "What would you do in my place?",
    "Is this normal, and what should I try first?",
    "Can you suggest a few things to try?",
    "How do I {task} in this situation?",
    "Should I worry about this?",
    "What is the cheapest way to fix it?",
]
NOTES_OPENINGS = [
    "Here are my notes about {topic} from the last few weeks:",
    "I wrote this down for my partner, but it got long. Notes on {topic}:",
    "Below is everything that happened with {topic} so far.",
    "My diary entries about {topic}, copied as they are:",
]
NOTES_ENDINGS = [
    "Can you summarize this in a few sentences and tell me what to do first?",
    "Please give me a short summary and the next step.",
    "What is the main problem here, in plain words?",
    "Could you turn this into a short plan?",
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant. Answer briefly and practically.",
    "You are a friendly expert who gives clear, step-by-step advice.",
    "You answer in plain English for someone without special training. Be kind and concise.",
    "Keep answers short. If something could be dangerous, say so first.",
]
FOLLOW_UPS = [
    "Thanks. And if that does not work?",
    "How long should that take?",
    "Is it expensive to do that?",
    "Why does that help, though?",
]
FOLLOW_UP_ANSWERS = [
    "Then try the next step on the list and give it a few days.",
    "Usually a week or two, depending on how bad it is now.",
    "Not really; most of it costs little or nothing.",
    "Because it deals with the cause, not only the symptom.",
]
STEP_WORDS = ["First", "Then", "Next", "After that", "Finally"]
LONG_ANSWER_OPENINGS = [
    "Good question. Here is how I would go about it, step by step.",
    "There are a few things worth trying, roughly in this order.",
    "This comes up a lot, and the fix is usually a handful of small habits.",
]
EXAMPLE_OPENINGS = ["For example, say", "A common case:", "I have seen this when", "It matters most when"]


def words(text: str) -> int:
    return len(text.split())


def sentence(rng: random.Random, domain: dict[str, list[str]]) -> str:
    """One sentence about the domain: a subject and what happened to it, sometimes joined to a second one."""
    text = f"{rng.choice(domain['subjects'])} {rng.choice(domain['predicates'])}"
    if rng.random() < 0.4:
        text += f", {rng.choice(CONNECTORS)} {rng.choice(domain['subjects'])} {rng.choice(domain['predicates'])}"
    return text[0].upper() + text[1:] + "."


def short_sentence(rng: random.Random) -> str:
    """A sentence of a few words: what tops a conversation up to a token count without overshooting."""
    return rng.choice(["It rained again.", "Nothing changed.", "I checked twice.", "Same as before.", "Still no luck."])


def user_prompt(rng: random.Random, domain: dict[str, list[str]], size: str) -> str:
    task = rng.choice(domain["tasks"])
    if size == "short":
        return rng.choice(SHORT_TEMPLATES).format(task=task)
    if size == "medium":
        context = [sentence(rng, domain) for _ in range(rng.randint(2, 5))]
        return " ".join(context) + " " + rng.choice(QUESTION_ENDINGS).format(task=task)
    lines = [rng.choice(NOTES_OPENINGS).format(topic=rng.choice(domain["subjects"]))]
    ending = rng.choice(NOTES_ENDINGS)
    target = rng.randint(120, PROMPT_WORDS[1])
    while True:
        candidate = sentence(rng, domain)
        if words(" ".join([*lines, candidate, ending])) > target:
            return "\n".join(lines) + "\n\n" + ending
        lines.append(candidate)


def answer(rng: random.Random, domain: dict[str, list[str]], size: str) -> str:
    if size == "tiny":
        return rng.choice(domain["short"])
    advice = rng.sample(domain["advice"], k=len(domain["advice"]))
    if size == "medium":
        return " ".join(advice[: rng.randint(1, 2)])
    steps = [f"{STEP_WORDS[i]}, {a[0].lower()}{a[1:]}" for i, a in enumerate(advice[:4])]
    text = "Here is what I would do. " + " ".join(steps)
    while words(text) > ANSWER_WORDS[1]:
        steps.pop()
        text = "Here is what I would do. " + " ".join(steps)
    return text


def conversation(rng: random.Random, index: int) -> dict[str, Any]:
    domain = DOMAINS[list(DOMAINS)[index % len(DOMAINS)]]
    prompt_size = ("short", "medium", "long")[index % 3]
    answer_size = rng.choice(("tiny", "medium", "medium", "long"))
    messages: list[dict[str, str]] = []
    if index % 4 == 1:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": user_prompt(rng, domain, prompt_size)})
    messages.append({"role": "assistant", "content": answer(rng, domain, answer_size)})
    if index % 6 == 4:
        follow = rng.randrange(len(FOLLOW_UPS))
        messages.append({"role": "user", "content": FOLLOW_UPS[follow]})
        messages.append({"role": "assistant", "content": FOLLOW_UP_ANSWERS[follow]})
    return {"messages": messages}


def long_answer(rng: random.Random, domain: dict[str, list[str]], target: int) -> str:
    """Numbered advice, each step sometimes followed by an example from the domain, to about `target` words."""
    advice = rng.sample(domain["advice"], k=len(domain["advice"]))
    parts = [rng.choice(LONG_ANSWER_OPENINGS)]
    for i in range(ANSWER_LONG_WORDS[1]):
        a = advice[i % len(advice)]
        parts.append(f"{i + 1}. {a}")
        if rng.random() < 0.5:
            parts.append(f"{rng.choice(EXAMPLE_OPENINGS)} {sentence(rng, domain).lower()}")
        if words(" ".join(parts)) >= target:
            break
    return " ".join(parts)


def answers_conversation(rng: random.Random, index: int) -> dict[str, Any]:
    """A short question and a long answer (30 to 300 words), no system message: most tokens carry the loss."""
    domain = DOMAINS[list(DOMAINS)[index % len(DOMAINS)]]
    question = rng.choice(SHORT_TEMPLATES).format(task=rng.choice(domain["tasks"]))
    if rng.random() < 0.5:
        question = f"{sentence(rng, domain)} {question}"
    target = rng.randint(*ANSWER_LONG_WORDS)
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": long_answer(rng, domain, target)},
        ]
    }


def prompts_conversation(rng: random.Random, index: int) -> dict[str, Any]:
    """A system message, a user turn of pasted notes (25 to 130 words) and a short answer (2 to 25 words): few
    tokens carry the loss."""
    domain = DOMAINS[list(DOMAINS)[index % len(DOMAINS)]]
    lines = [rng.choice(NOTES_OPENINGS).format(topic=rng.choice(domain["subjects"]))]
    ending = rng.choice(NOTES_ENDINGS)
    target = rng.randint(*PROMPT_NOTES_WORDS)
    while words(" ".join([*lines, ending])) < target:
        lines.append(sentence(rng, domain))
    reply = rng.choice(domain["short"]) if rng.random() < 0.5 else rng.choice(domain["advice"])
    return {
        "messages": [
            {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
            {"role": "user", "content": "\n".join(lines) + "\n\n" + ending},
            {"role": "assistant", "content": reply},
        ]
    }


def long_conversation(rng: random.Random, index: int, encoded_length: Any) -> dict[str, Any]:
    """Pasted notes topped up, sentence by sentence and then with short ones, to 500-512 tokens in all."""
    domain = DOMAINS[list(DOMAINS)[index % len(DOMAINS)]]
    advice = rng.sample(domain["advice"], k=4)
    reply = "Here is what I would do. " + " ".join(
        f"{STEP_WORDS[i]}, {a[0].lower()}{a[1:]}" for i, a in enumerate(advice)
    )
    opening = rng.choice(NOTES_OPENINGS).format(topic=rng.choice(domain["subjects"]))
    ending = rng.choice(NOTES_ENDINGS)

    def messages(lines: list[str]) -> list[dict[str, str]]:
        prompt = "\n".join([opening, *lines]) + "\n\n" + ending
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]

    lines: list[str] = []
    for make in (lambda: sentence(rng, domain), lambda: short_sentence(rng)):
        misses = 0
        while misses < 3:  # a few tries: a shorter candidate may still fit
            candidate = make()
            if encoded_length(messages([*lines, candidate])) <= MAX_TOKENS_512:
                lines.append(candidate)
            else:
                misses += 1
    return {"messages": messages(lines)}


def main() -> None:
    from app.core.settings import Settings
    from app.ml.formatting import encode_chat
    from app.ml.models import BUILTINS, ModelStore

    tokenizer = ModelStore(Settings().models_dir, None).tokenizer(BUILTINS["smollm2-135m-instruct"])

    def encoded_length(messages: list[dict[str, str]]) -> int:
        return len(encode_chat(tokenizer, messages).input_ids)

    rng = random.Random(SEED)
    chat = [conversation(rng, i) for i in range(N_EXAMPLES)]
    rng.shuffle(chat)
    for record in chat:
        for message in record["messages"]:
            low, high = ANSWER_WORDS if message["role"] == "assistant" else PROMPT_WORDS
            if message["role"] != "system":
                assert low <= words(message["content"]) <= high, message
    long = [long_conversation(rng, i, encoded_length) for i in range(N_EXAMPLES)]
    # Each of the other shapes from a generator of its own: the files above stay as they were.
    rng = random.Random(SEED + 1)
    answers = [answers_conversation(rng, i) for i in range(N_EXAMPLES)]
    rng.shuffle(answers)
    rng = random.Random(SEED + 2)
    prompts = [prompts_conversation(rng, i) for i in range(N_EXAMPLES)]
    rng.shuffle(prompts)

    for name, records in (
        ("chat.jsonl", chat),
        ("chat_512.jsonl", long),
        ("answers.jsonl", answers),
        ("prompts.jsonl", prompts),
    ):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        encoded = [encode_chat(tokenizer, r["messages"]) for r in records]
        lengths = [len(e.input_ids) for e in encoded]
        loss = [e.n_loss_tokens for e in encoded]
        user = [words(m["content"]) for r in records for m in r["messages"] if m["role"] == "user"]
        assistant = [words(m["content"]) for r in records for m in r["messages"] if m["role"] == "assistant"]
        print(
            f"{name}: {len(records)} conversations; tokens {min(lengths)}-{max(lengths)} "
            f"(median {statistics.median(lengths):.0f}, total {sum(lengths)}), loss-bearing {sum(loss)} "
            f"({min(loss)}-{max(loss)} each); user turns {min(user)}-{max(user)} words, "
            f"assistant turns {min(assistant)}-{max(assistant)} words"
        )


if __name__ == "__main__":
    main()
