from scheduler_agent.cli import main

main()
