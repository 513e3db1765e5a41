"""`builtin:code`: a small offline set of Python tasks with tests, for `code_tests`.

Each row has a `prompt`, its `tests` (assert statements, or {input, output} pairs for
programs that read stdin and print) and a reference `solution` that passes them all. Small
and offline on purpose: the tests and the CPU demo of code execution need no download; train
on a real set (the qwen2.5-1.5b-mbpp preset reads MBPP) for anything else.
"""

from __future__ import annotations

_ASSERT_TASKS = [
    ("Write a function `add(a, b)` that returns the sum of two numbers.",
     "def add(a, b):\n    return a + b\n",
     ["assert add(1, 2) == 3", "assert add(-4, 4) == 0", "assert add(2.5, 0.5) == 3.0"]),
    ("Write a function `is_even(n)` that returns True when the integer n is even.",
     "def is_even(n):\n    return n % 2 == 0\n",
     ["assert is_even(4)", "assert not is_even(7)", "assert is_even(0)"]),
    ("Write a function `reverse_words(s)` that reverses the order of the words in a sentence.",
     "def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n",
     ["assert reverse_words('a b c') == 'c b a'", "assert reverse_words('hello') == 'hello'",
      "assert reverse_words('') == ''"]),
    ("Write a function `count_vowels(s)` that counts the vowels (a, e, i, o, u, either case) in a string.",
     "def count_vowels(s):\n    return sum(ch in 'aeiouAEIOU' for ch in s)\n",
     ["assert count_vowels('hello') == 2", "assert count_vowels('xyz') == 0", "assert count_vowels('AEIOU') == 5"]),
    ("Write a function `factorial(n)` that returns n! for a non-negative integer n.",
     "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n",
     ["assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(10) == 3628800"]),
    ("Write a function `max_of_list(xs)` that returns the largest number in a non-empty list.",
     "def max_of_list(xs):\n    return max(xs)\n",
     ["assert max_of_list([1, 5, 3]) == 5", "assert max_of_list([-2, -9]) == -2", "assert max_of_list([7]) == 7"]),
    ("Write a function `is_palindrome(s)` that tells whether a string reads the same backwards.",
     "def is_palindrome(s):\n    return s == s[::-1]\n",
     ["assert is_palindrome('racecar')", "assert not is_palindrome('abc')", "assert is_palindrome('')"]),
    ("Write a function `fizzbuzz(n)` that returns 'Fizz' for multiples of 3, 'Buzz' for multiples of 5, "
     "'FizzBuzz' for multiples of both, and the number as a string otherwise.",
     "def fizzbuzz(n):\n    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n"
     "    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)\n",
     ["assert fizzbuzz(3) == 'Fizz'", "assert fizzbuzz(10) == 'Buzz'", "assert fizzbuzz(30) == 'FizzBuzz'",
      "assert fizzbuzz(7) == '7'"]),
    ("Write a function `unique_sorted(xs)` that returns the distinct items of a list in ascending order.",
     "def unique_sorted(xs):\n    return sorted(set(xs))\n",
     ["assert unique_sorted([3, 1, 3, 2]) == [1, 2, 3]", "assert unique_sorted([]) == []"]),
    ("Write a function `fib(n)` that returns the n-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.",
     "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     ["assert fib(0) == 0", "assert fib(1) == 1", "assert fib(10) == 55", "assert fib(30) == 832040"]),
    ("Write a function `char_count(s)` that returns a dict mapping each character of s to how often it occurs.",
     "def char_count(s):\n    counts = {}\n    for ch in s:\n        counts[ch] = counts.get(ch, 0) + 1\n"
     "    return counts\n",
     ["assert char_count('aab') == {'a': 2, 'b': 1}", "assert char_count('') == {}"]),
    ("Write a function `flatten(xss)` that flattens a list of lists by one level.",
     "def flatten(xss):\n    return [x for xs in xss for x in xs]\n",
     ["assert flatten([[1, 2], [3], []]) == [1, 2, 3]", "assert flatten([]) == []"]),
]

_IO_TASKS = [
    ("Write a program that reads two integers on one line and prints their sum.",
     "a, b = map(int, input().split())\nprint(a + b)\n",
     [{"input": "1 2\n", "output": "3\n"}, {"input": "-5 5\n", "output": "0\n"},
      {"input": "100 23\n", "output": "123\n"}]),
    ("Write a program that reads a line of text and prints it in upper case.",
     "print(input().upper())\n",
     [{"input": "hello\n", "output": "HELLO\n"}, {"input": "MiXeD 1\n", "output": "MIXED 1\n"}]),
    ("Write a program that reads an integer n and prints the numbers 1 to n, one per line.",
     "n = int(input())\nfor i in range(1, n + 1):\n    print(i)\n",
     [{"input": "3\n", "output": "1\n2\n3\n"}, {"input": "1\n", "output": "1\n"}]),
    ("Write a program that reads a list of integers on one line and prints the largest.",
     "print(max(map(int, input().split())))\n",
     [{"input": "3 9 2\n", "output": "9\n"}, {"input": "-1 -7\n", "output": "-1\n"}]),
]


def code_rows() -> list[dict]:
    """Every task once: `prompt`, `tests` and the reference `solution`."""
    return [{"prompt": prompt, "tests": tests, "solution": solution}
            for prompt, solution, tests in _ASSERT_TASKS + _IO_TASKS]
