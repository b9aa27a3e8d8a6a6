"""Largest-remainder apportionment, checked by hand."""

from hetalloc.apportion import largest_remainder


def test_floors_then_largest_remainders():
    # exact shares 10 * (1, 2, 3, 4) / 10 = 1, 2, 3, 4: nothing left over
    assert largest_remainder(10, [1, 2, 3, 4]) == [1, 2, 3, 4]
    # 7 * (1, 1, 1) / 3 = 2.33 each: floors 2, 2, 2; one left, ties go to the first part
    assert largest_remainder(7, [1, 1, 1]) == [3, 2, 2]
    # 4 * (5, 3) / 8 = 2.5, 1.5: floors 2, 1; one left, equal remainders: the first
    assert largest_remainder(4, [5, 3]) == [3, 1]
    # 5 * (1, 8, 1) / 10 = 0.5, 4, 0.5: floors 0, 4, 0; the first 0.5 remainder wins
    assert largest_remainder(5, [1, 8, 1]) == [1, 4, 0]


def test_minimum_per_part():
    # 4 * (1, 1, 10) / 12 = 0.33, 0.33, 3.33: lifted to 1, 1, 3 (sum 5 > 4); the part
    # furthest above its share (0.67 above, then the larger: the first) gives one back
    assert largest_remainder(4, [1, 1, 10], minimum=1) == [1, 1, 2]
    # 3 over three parts of at least 1: one each whatever the weights
    assert largest_remainder(3, [1, 5, 9], minimum=1) == [1, 1, 1]
    # fewer than one each is impossible
    assert largest_remainder(2, [1, 1, 1], minimum=1) == []
    # the parts always add up
    for total in range(3, 40):
        assert sum(largest_remainder(total, [1.0, 2.5, 7.25], minimum=1)) == total
