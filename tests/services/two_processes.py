from titan_broker import process


@process(name="first")
class First:
    pass


@process(name="second")
class Second:
    pass
