def main() -> None:
    print("loraplex")
