"""A small play in pseudo-English, generated from a seed: the tests' own corpus, so they need nothing beside the repo.

It has what the tests rely on: ~60 distinct characters (upper and lower case, punctuation, newlines), speaker
tags such as "ROMEO:" for sampling prompts, and enough structure (a grammar over a few hundred words) that a
tiny model's loss falls clearly within tens of steps, while never repeating exactly.
"""
import random

SPEAKERS = ("ROMEO", "JULIET", "NURSE", "FRIAR", "KING", "QUEEN", "MERCUTIO", "TYBALT", "CAPULET", "PRINCE",
            "BENVOLIO", "LADY")
NOUNS = ("night day love heart sword king queen moon sun star rose crown blood grave hand eye word name death "
         "life house friend lord lady father mother son daughter city wall gate garden church tomb ring letter "
         "poison kiss tear grief joy fortune heaven hell fire water wind storm field river bird horse voice "
         "dream truth honour shame youth age time hour morning evening tongue breath soul spirit").split()
VERBS = ("love hate see hear know keep take give call bring find leave meet kill save fear trust swear speak "
         "follow seek hold break mend bless curse wake sleep dream weep laugh fight yield serve").split()
ADJECTIVES = ("gentle fair sweet noble cruel bitter dark bright young old true false good wicked happy sad "
              "proud poor rich cold warm quiet loud strange dear heavy light wild holy").split()
OPENERS = ("O", "Alas", "Nay", "Ay", "Good", "Come", "Hark", "Peace", "Well", "Now", "Fie", "Soft")


def sentence(rng):
    noun, noun2 = rng.choice(NOUNS), rng.choice(NOUNS)
    adj, adj2, verb = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES), rng.choice(VERBS)
    subject = rng.choice(("I", "thou", "he", "she", "we", "they", f"the {adj} {noun}", f"my {noun}"))
    forms = (
        f"{subject} shall {verb} the {adj2} {noun2}",
        f"{subject} doth {verb} thy {noun2}",
        f"what {adj} {noun} is this",
        f"{subject} will not {verb} my {adj2} {noun2}",
        f"the {noun} of {rng.choice(SPEAKERS).capitalize()} is {adj}",
        f"{rng.choice(OPENERS)}, {subject} must {verb} the {noun2} ere {rng.choice(('night', 'morning', 'death'))}",
        f"let us {verb} the {adj} {noun} and {rng.choice(VERBS)} our {noun2}",
    )
    text = rng.choice(forms)
    text = text[0].upper() + text[1:]
    return text + rng.choice((".", ".", ".", "!", "?", ";", ", and yet"))


def play(n_chars=300_000, seed=0):
    """About n_chars characters of speeches: 'NAME:\\n' then one to four lines of sentences, then a blank line."""
    rng, parts, size = random.Random(seed), [], 0
    while size < n_chars:
        lines = [" ".join(sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
        speech = f"{rng.choice(SPEAKERS)}:\n" + "\n".join(lines) + "\n\n"
        parts.append(speech)
        size += len(speech)
    return "".join(parts)[:n_chars]
