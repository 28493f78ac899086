from cl_agent.cli import main

main()
